//! takeoverd under test, and `takeoverd ctl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use takeoverd::status::Status;
use testkit::poll_until;

use crate::procs::{self, Bins};

/// The outcome of one `takeoverd ctl reload`.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// Exit status 0.
    pub ok: bool,
    /// What it printed (stdout and stderr).
    pub output: String,
}

/// `takeoverd ctl --control-socket PATH status --json`.
pub fn ctl_status(bins: &Bins, ctl: &Path) -> anyhow::Result<Status> {
    let out = Command::new(&bins.takeoverd)
        .arg("ctl")
        .arg("--control-socket")
        .arg(ctl)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()
        .context("running takeoverd ctl status")?;
    if !out.status.success() {
        bail!("takeoverd ctl status failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("unreadable status: {text}"))
}

/// `takeoverd ctl --control-socket PATH reload`.
pub fn ctl_reload(bins: &Bins, ctl: &Path) -> anyhow::Result<ReloadOutcome> {
    ctl_waiting(bins, ctl, "reload")
}

/// `takeoverd ctl --control-socket PATH upgrade`.
pub fn ctl_upgrade(bins: &Bins, ctl: &Path) -> anyhow::Result<ReloadOutcome> {
    ctl_waiting(bins, ctl, "upgrade")
}

/// `takeoverd ctl --control-socket PATH COMMAND` for a command that waits
/// for its outcome (`reload`, `upgrade`).
fn ctl_waiting(bins: &Bins, ctl: &Path, command: &str) -> anyhow::Result<ReloadOutcome> {
    let out = Command::new(&bins.takeoverd)
        .arg("ctl")
        .arg("--control-socket")
        .arg(ctl)
        .args([command, "--timeout-s", "60"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running takeoverd ctl {command}"))?;
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(ReloadOutcome { ok: out.status.success(), output: output.trim().to_owned() })
}

/// Polls the status until it shows at least `n` connections (and a worker).
pub fn wait_connections(bins: &Bins, ctl: &Path, n: u64, timeout: Duration) -> anyhow::Result<Status> {
    let (mut last, mut held) = (None, None);
    let waited = poll_until(&format!("takeoverd holds {n} connections"), timeout, || {
        last = ctl_status(bins, ctl).ok();
        held = last.as_ref().map(|s| s.connections).or(held);
        last.as_ref().is_some_and(|s| s.connections as u64 >= n && s.worker_pid.is_some())
    });
    match (waited, last) {
        (Ok(()), Some(s)) => Ok(s),
        _ => bail!(
            "takeoverd holds {} connections after {timeout:?}, expected {n}",
            held.map_or("?".into(), |c| c.to_string())
        ),
    }
}

/// takeoverd's arguments for `workers` workers: none for 1 (its default,
/// what every other run uses), else `--workers N`.
pub fn workers_args(workers: usize) -> Vec<String> {
    if workers > 1 {
        vec!["--workers".into(), workers.to_string()]
    } else {
        Vec::new()
    }
}

/// A worker serves, and so does every slot of `--workers N` (a takeoverd
/// that reports no slots: its one worker).
fn every_worker_serves(s: &Status) -> bool {
    s.worker_pid.is_some() && s.workers.iter().all(|w| w.pid.is_some())
}

/// A takeoverd started by the benchmark (with its own workers).
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    /// takeoverd's pid.
    pub pid: u32,
    /// Its control socket.
    pub ctl: PathBuf,
    /// Its log (takeoverd's and its workers' stderr).
    pub log: PathBuf,
    /// The port it listens on.
    pub port: u16,
    bins: Bins,
}

impl Server {
    /// Starts takeoverd on a free port (retrying on a port race), pinned to
    /// `cpu` if given, and waits until its worker serves.
    pub fn start(bins: &Bins, dir: &Path, tag: &str, cpu: Option<usize>) -> anyhow::Result<Server> {
        Server::start_with(bins, dir, tag, cpu, &[])
    }

    /// [`Server::start`] with `extra` arguments for takeoverd (such as
    /// [`workers_args`]); waits until every worker serves.
    pub fn start_with(
        bins: &Bins,
        dir: &Path,
        tag: &str,
        cpu: Option<usize>,
        extra: &[String],
    ) -> anyhow::Result<Server> {
        let mut last_err = None;
        for attempt in 0..3 {
            let port = procs::free_port()?;
            let ctl = dir.join(format!("{tag}-{attempt}.ctl"));
            let log = dir.join(format!("{tag}-{attempt}.log"));
            let logf = std::fs::File::create(&log)?;
            let mut cmd = procs::command(&bins.takeoverd, cpu);
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--control-socket")
                .arg(&ctl)
                .arg("--worker")
                .arg(&bins.worker)
                .args(extra)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(logf);
            let mut child = procs::spawn(&mut cmd)?;
            let pid = child.id();
            let mut exited = false;
            let _ = poll_until("takeoverd's workers serve", Duration::from_secs(10), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || (ctl.exists() && ctl_status(bins, &ctl).is_ok_and(|s| every_worker_serves(&s)))
            });
            let up = !exited && ctl_status(bins, &ctl).is_ok_and(|s| every_worker_serves(&s));
            if up {
                return Ok(Server { child: Some(child), pid, ctl, log, port, bins: bins.clone() });
            }
            procs::kill_group(&mut child);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            last_err = Some(format!("takeoverd did not come up on port {port}: {}", last_lines(&text, 5)));
        }
        bail!("{}", last_err.unwrap_or_default())
    }

    /// `ctl status --json`.
    pub fn status(&self) -> anyhow::Result<Status> {
        ctl_status(&self.bins, &self.ctl)
    }

    /// `ctl reload`.
    pub fn reload(&self) -> anyhow::Result<ReloadOutcome> {
        ctl_reload(&self.bins, &self.ctl)
    }

    /// `ctl upgrade` (takeoverd re-executes itself in place).
    pub fn upgrade(&self) -> anyhow::Result<ReloadOutcome> {
        ctl_upgrade(&self.bins, &self.ctl)
    }

    /// The serving worker's pid.
    pub fn worker_pid(&self) -> anyhow::Result<u32> {
        let s = self.status()?;
        s.worker_pid.context("takeoverd reports no worker")
    }

    /// The pids of every serving worker, slot by slot (the one worker's
    /// from a takeoverd that reports no slots).
    pub fn worker_pids(&self) -> anyhow::Result<Vec<u32>> {
        let s = self.status()?;
        let pids: Vec<u32> = s.workers.iter().filter_map(|w| w.pid).collect();
        if pids.is_empty() {
            return Ok(vec![s.worker_pid.context("takeoverd reports no worker")?]);
        }
        Ok(pids)
    }

    /// Waits for `n` connections.
    pub fn wait_connections(&self, n: u64, timeout: Duration) -> anyhow::Result<Status> {
        wait_connections(&self.bins, &self.ctl, n, timeout)
    }

    /// Stops takeoverd: SIGTERM (a clean stop, which also ends its worker),
    /// then SIGKILL to its whole group after 5 s.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
            let _ = testkit::wait_timeout(&mut child, Duration::from_secs(5));
            procs::kill_group(&mut child);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The last `n` lines of `text`, joined with " | ".
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
