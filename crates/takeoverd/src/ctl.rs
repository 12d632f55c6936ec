//! The control socket (`takeoverd ctl ...`): a `SOCK_SEQPACKET` Unix socket,
//! mode 0600, that accepts only root and the service's own uid. One JSON
//! request, one JSON reply.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use takeoverd::protocol::Request;
use takeoverd::status::{ReloadRecord, Status};

/// The default control socket: `$RUNTIME_DIRECTORY/control.sock` under
/// systemd, else `$XDG_RUNTIME_DIR/takeoverd.sock`, else
/// `/tmp/takeoverd-$UID.sock`.
pub fn default_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // RuntimeDirectory= may list several, separated by ':'.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
        return Path::new(&first).join("control.sock");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("takeoverd.sock");
    }
    PathBuf::from(format!("/tmp/takeoverd-{}.sock", nix::unistd::geteuid()))
}

/// `takeoverd ctl reload`: asks for a reload, waits for its outcome.
/// Returns the process exit status (0 ok, 1 failed).
pub fn reload(path: &Path, timeout: Duration) -> anyhow::Result<i32> {
    let reply = request(path, Request::Reload, timeout)?;
    let rec: ReloadRecord = serde_json::from_slice(&reply).context("unreadable reply from takeoverd")?;
    if rec.ok {
        let pause = rec.pause_ms.map_or("none".into(), |p| format!("{p:.3} ms"));
        println!(
            "reload ok: generation {}, worker pid {}, clients paused {pause}, reload took {:.2} ms",
            rec.generation,
            rec.worker_pid.unwrap_or(0),
            rec.handoff_ms
        );
        Ok(0)
    } else {
        eprintln!("reload failed: {}", rec.error.as_deref().unwrap_or("unknown reason"));
        Ok(1)
    }
}

/// `takeoverd ctl upgrade`: asks for an in-place upgrade, waits for its
/// outcome. Returns the process exit status (0: the new binary runs).
pub fn upgrade(path: &Path, timeout: Duration) -> anyhow::Result<i32> {
    let reply = request(path, Request::Upgrade, timeout)?;
    let r: takeoverd::status::UpgradeReply =
        serde_json::from_slice(&reply).context("unreadable reply from takeoverd")?;
    if r.ok {
        println!(
            "upgrade ok: takeoverd {} -> {}, pid {} (unchanged), worker {} untouched, {} connections carried, took {:.2} ms",
            r.from,
            r.to,
            r.pid,
            r.worker_pid.map_or("none".into(), |p| p.to_string()),
            r.connections,
            r.took_ms
        );
        Ok(0)
    } else {
        eprintln!("upgrade failed: {}", r.error.as_deref().unwrap_or("unknown reason"));
        Ok(1)
    }
}

/// `takeoverd ctl workers N`: asks for N workers, waits for the outcome.
/// Returns the process exit status (0: N workers run, every move made).
pub fn workers(path: &Path, count: usize, timeout: Duration) -> anyhow::Result<i32> {
    let reply = request(path, Request::Workers { count }, timeout)?;
    let r: takeoverd::status::ResizeReply =
        serde_json::from_slice(&reply).context("unreadable reply from takeoverd")?;
    for note in &r.notes {
        eprintln!("note: {note}");
    }
    if r.ok {
        println!(
            "workers: {} -> {}, {} connections moved between workers, took {:.2} ms",
            r.from, r.to, r.moved, r.took_ms
        );
        Ok(0)
    } else {
        eprintln!(
            "changing the number of workers failed ({} -> {} running now, {} connections moved): {}",
            r.from,
            r.to,
            r.moved,
            r.error.as_deref().unwrap_or("unknown reason")
        );
        Ok(1)
    }
}

/// `takeoverd ctl status`: prints the status, as JSON or for people.
pub fn status(path: &Path, json: bool) -> anyhow::Result<i32> {
    let reply = request(path, Request::Status, Duration::from_secs(10))?;
    if json {
        println!("{}", String::from_utf8_lossy(&reply));
        return Ok(0);
    }
    let s: Status = serde_json::from_slice(&reply).context("unreadable reply from takeoverd")?;
    print!("{}", s.human());
    Ok(0)
}

fn request(path: &Path, req: Request, timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let chan = takeover::connect(path).with_context(|| {
        format!("is takeoverd running? (control socket {}; pass --control-socket if it is elsewhere)", path.display())
    })?;
    let deadline = Some(Instant::now() + timeout);
    takeover::wire::send(chan.as_fd(), &serde_json::to_vec(&req)?, &[], deadline)?;
    match takeover::wire::recv(chan.as_fd(), deadline)? {
        Some(r) => Ok(r.bytes),
        None => bail!("takeoverd closed the control connection without an answer"),
    }
}
