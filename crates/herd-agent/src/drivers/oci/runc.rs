//! The OCI runtime's command line, as the driver uses it: `runc` with its state under
//! the driver's own root (never the host's default `/run/runc`), and its own errors kept
//! in a per-container log so a failure says what runc said.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long one runc command may take; `run -d` returns once the init is started.
const RUNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(super) struct Runc {
    pub(super) binary: PathBuf,
    /// `--root`: where runc keeps the state of the containers it runs for us.
    pub(super) root: PathBuf,
}

impl Runc {
    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .arg("--root")
            .arg(&self.root)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs `runc <args>`; the error is what runc printed, or why it could not run.
    async fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut command = self.command();
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = tokio::time::timeout(RUNC_TIMEOUT, command.output())
            .await
            .map_err(|_| format!("runc {} took longer than {RUNC_TIMEOUT:?}", args[0]))?
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "runc {}: {}",
                args.first().copied().unwrap_or(""),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// The first line of `runc --version`.
    pub(super) async fn version(&self) -> Result<String, String> {
        let out = self.exec(&["--version"]).await?;
        Ok(out
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("runc version ")
            .to_string())
    }

    /// Starts the container `name` from `bundle`, detached; its stdout and stderr (the
    /// console) go to `console`, its init's pid to `pid_file`.
    pub(super) async fn run(
        &self,
        name: &str,
        bundle: &Path,
        pid_file: &Path,
        console: &Path,
        log: &Path,
    ) -> Result<(), String> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(console)
                .map_err(|e| format!("opening {}: {e}", console.display()))
        };
        let _ = std::fs::remove_file(log);
        let mut command = self.command();
        command
            .arg("--log")
            .arg(log)
            .args(["--log-format", "json", "run", "--detach", "--pid-file"])
            .arg(pid_file)
            .arg("--bundle")
            .arg(bundle)
            .arg(name)
            .stdout(open()?)
            .stderr(open()?);
        let status = tokio::time::timeout(RUNC_TIMEOUT, command.status())
            .await
            .map_err(|_| format!("runc run took longer than {RUNC_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if status.success() {
            Ok(())
        } else {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            Err(last_error(&said).unwrap_or_else(|| format!("runc run failed ({status})")))
        }
    }

    pub(super) async fn pause(&self, name: &str) -> Result<(), String> {
        self.exec(&["pause", name]).await.map(drop)
    }

    pub(super) async fn resume(&self, name: &str) -> Result<(), String> {
        self.exec(&["resume", name]).await.map(drop)
    }

    /// Changes a running container's CPU quota and memory limit in its cgroup.
    pub(super) async fn update(
        &self,
        name: &str,
        cpu_quota_us: u64,
        cpu_period_us: u64,
        memory_bytes: u64,
    ) -> Result<(), String> {
        let (quota, period, memory) = (
            cpu_quota_us.to_string(),
            cpu_period_us.to_string(),
            memory_bytes.to_string(),
        );
        self.exec(&[
            "update",
            "--cpu-quota",
            &quota,
            "--cpu-period",
            &period,
            "--memory",
            &memory,
            name,
        ])
        .await
        .map(drop)
    }

    /// Sends `signal` (`TERM`, `KILL`) to the container's init.
    pub(super) async fn kill(&self, name: &str, signal: &str) -> Result<(), String> {
        self.exec(&["kill", name, signal]).await.map(drop)
    }

    /// Removes the container's runc state and cgroups, ending it if it still runs.
    /// Succeeds if runc does not know the container.
    pub(super) async fn delete(&self, name: &str) -> Result<(), String> {
        match self.exec(&["delete", "--force", name]).await {
            Ok(_) => Ok(()),
            Err(e) if e.contains("does not exist") || e.contains("not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The message of the last error runc logged (its log is one JSON object per line).
pub(super) fn last_error(log: &str) -> Option<String> {
    log.lines().rev().find_map(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        (entry["level"] == "error" || entry["level"] == "fatal")
            .then(|| entry["msg"].as_str().map(str::to_string))
            .flatten()
    })
}

/// What `criu check` says: `None` if checkpoints work here, else its last error line.
pub(super) async fn criu_problem() -> Option<String> {
    let output = tokio::process::Command::new("criu")
        .arg("check")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RUNC_TIMEOUT, output).await {
        Err(_) => Some("criu check hangs".into()),
        Ok(Err(e)) => Some(format!("criu is not installed ({e})")),
        Ok(Ok(out)) if out.status.success() => None,
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            Some(criu_reason(&text))
        }
    }
}

/// The line of `criu check` output that says why: the first error, without its source
/// location prefix.
pub(super) fn criu_reason(output: &str) -> String {
    let line = output
        .lines()
        // criu's helpers failing ("exited, status=1") come first; the cause follows.
        .find(|l| l.starts_with("Error") && !l.contains("exited, status="))
        .or_else(|| output.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("failed without a message");
    match line.split_once("): ") {
        Some((_, reason)) => reason.trim().to_string(),
        None => line.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_runcs_last_error() {
        let log = "{\"level\":\"warning\",\"msg\":\"a\"}\n\
                   {\"level\":\"error\",\"msg\":\"runc run failed: chdir /x: no such file\"}\n\
                   not json\n";
        assert_eq!(
            last_error(log).as_deref(),
            Some("runc run failed: chdir /x: no such file")
        );
        assert_eq!(last_error(""), None);
    }

    #[test]
    fn criu_reason_is_the_first_error() {
        let out = "Error (criu/util.c:642): exited, status=1\n\
                   Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.\n\
                   Error (criu/crtools.c:260): Could not initialize kernel features detection.\n";
        assert_eq!(
            criu_reason(out),
            "kerndat_vdso_fill_symtable failed when initializing kerndat."
        );
        assert_eq!(criu_reason(""), "failed without a message");
    }
}
