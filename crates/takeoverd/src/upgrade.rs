//! `takeoverd ctl upgrade`: takeoverd re-executes the binary on disk in
//! place. Same pid (systemd's `MainPID` does not change), every listener,
//! connection, worker channel and state carried across `execve`, and the
//! serving worker never stopped: its clients see nothing, and new
//! connections wait in the listen backlog for the few milliseconds of the
//! exec.
//!
//! ```text
//! old image                                     new image (same pid)
//!   check: `BINARY --upgrade-check` prints
//!   the upgrade-state version it reads ── refuse if missing, not
//!                                          executable, another version
//!   snapshot (JSON in a memfd): the fd
//!   numbers of everything held, names,
//!   states, the worker, the fd store's
//!   bookkeeping; fds left open across exec
//!   execve(BINARY) ─────────────────────────▶  takes every fd, checks each is
//!   (exec failed: everything is still               what the snapshot says
//!    ours; reply the error, serve on)           ├─ ok: adopts the worker, serves,
//!                                               │      answers `ctl upgrade`
//!                                               └─ not: execs the previous
//!                                                  image's binary (kept open)
//!                                                  with the same snapshot
//! ```
//!
//! This file is the running image's side (the check, the snapshot, the
//! exec); `upgraded.rs` is the new image's (taking the snapshot, or going
//! back to the previous binary).
//!
//! Nothing is lost on any failure: before the exec nothing has changed;
//! after it, the previous binary takes the same snapshot; should that fail
//! too (or either image die), takeoverd exits, its workers see their
//! channel end and exit, and systemd restarts takeoverd with everything
//! from the fd store (without systemd, that last case loses the
//! connections, as a crash of takeoverd always does).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::fdstore::{extend_usec, monotonic_usec, notify, StoreSnapshot};
use crate::supervisor::Supervisor;
use crate::workers::Who;
use takeoverd::status::{ReloadRecord, UpgradeReply};

/// The version of the snapshot this build writes with one worker: version
/// 1, which every upgradable takeoverd reads. With `--workers N` > 1 it
/// writes version 2 (version 1 plus `others` and `slots`), which a binary
/// must say it reads. A binary that cannot read what would be written is
/// refused before anything changes.
pub const STATE_VERSION: u32 = 1;
/// The snapshot versions this build reads.
pub const READS: [u32; 2] = [1, 2];
/// What `--upgrade-check` prints on its second line before the versions it
/// reads (the first line names version 1, for takeoverds that read only it).
pub const READS_LINE: &str = "takeoverd upgrade-reads";

/// Names the snapshot memfd in the new image's environment.
pub(crate) const SNAPSHOT_ENV: &str = "TAKEOVERD_UPGRADE_FD";
/// Set when the new image could not take the snapshot and handed it back to
/// the previous binary: that one must not fall back again.
pub(crate) const FALLBACK_ENV: &str = "TAKEOVERD_UPGRADE_FALLBACK";
/// What `takeoverd --upgrade-check` prints before its version.
pub const CHECK_LINE: &str = "takeoverd upgrade-state";
/// How long the candidate binary may take to answer `--upgrade-check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a new image needs, by fd number (fds keep their numbers
/// across `execve`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub(crate) version: u32,
    /// The previous image's package version, for the log and the reply.
    pub(crate) from: String,
    /// When the upgrade began (Unix time, ms), to report how long it took.
    pub(crate) began_ms: f64,
    pub(crate) generation: u64,
    pub(crate) listeners: Vec<(String, RawFd, String)>,
    pub(crate) conns: Vec<(String, RawFd, Option<Box<RawValue>>)>,
    pub(crate) state: RawFd,
    pub(crate) ctl: (RawFd, PathBuf),
    /// The control connection that asked for the upgrade.
    pub(crate) reply: RawFd,
    pub(crate) store: StoreSnapshot,
    /// Slot 0's worker.
    pub(crate) worker: CarriedWorker,
    /// Version 2: the workers of slots 1 and up (`--workers N`).
    #[serde(default)]
    pub(crate) others: Vec<CarriedWorker>,
    /// Version 2: each connection's slot, in the order of `conns` (version
    /// 1: all 0).
    #[serde(default)]
    pub(crate) slots: Vec<usize>,
    /// Workers told to exit and not reaped yet.
    pub(crate) retiring: Vec<u32>,
    pub(crate) reloads: Vec<ReloadRecord>,
    pub(crate) restarts: u64,
    pub(crate) upgrades: u64,
    /// The previous image's binary, open: where to go back to.
    pub(crate) fallback: RawFd,
    /// The previous image lowered its priority for the upgrade: the new one
    /// returns to nice 0 once it serves.
    #[serde(default)]
    pub(crate) background: bool,
}

impl Snapshot {
    /// Every fd the snapshot names, with what it must be (`None`: the
    /// worker's stderr pipe, any file) and what it is for: what the exec
    /// leaves open and the new image takes.
    pub(crate) fn carried(&self) -> Vec<(RawFd, Option<takeover::Kind>, String)> {
        use takeover::Kind;
        let mut out: Vec<(RawFd, Option<Kind>, String)> = Vec::new();
        for (name, fd, _) in &self.listeners {
            out.push((*fd, Some(Kind::TcpListener), format!("listener {name}")));
        }
        for (name, fd, _) in &self.conns {
            out.push((*fd, Some(Kind::TcpStream), format!("connection {name}")));
        }
        out.push((self.state, Some(Kind::File), "the state memfd".into()));
        out.push((self.ctl.0, Some(Kind::UnixSeqpacket), "the control socket".into()));
        out.push((self.reply, Some(Kind::UnixSeqpacket), "the upgrade's control connection".into()));
        for (r, w, _, _) in &self.store.overflow.pairs {
            out.push((*r, Some(Kind::UnixSeqpacket), "an overflow pair".into()));
            out.push((*w, Some(Kind::UnixSeqpacket), "an overflow pair".into()));
        }
        for (i, w) in [&self.worker].into_iter().chain(&self.others).enumerate() {
            out.push((w.chan, Some(Kind::UnixSeqpacket), format!("worker {i}'s channel")));
            out.push((w.stderr, None, format!("worker {i}'s stderr")));
        }
        out.push((self.fallback, Some(Kind::File), "the previous binary".into()));
        out
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CarriedWorker {
    pub(crate) pid: u32,
    pub(crate) chan: RawFd,
    pub(crate) stderr: RawFd,
    /// Its channel version (1 or 2).
    pub(crate) proto: u32,
    /// How long it has served, in ms.
    pub(crate) served_ms: u64,
}

/// Set in a new image: what to report once it serves.
#[derive(Debug)]
pub struct Upgraded {
    pub(crate) reply: OwnedFd,
    pub(crate) from: String,
    pub(crate) began_ms: f64,
    /// The new binary failed to take the snapshot; this is the previous one again.
    pub(crate) fell_back: Option<String>,
    /// Return to nice 0 (see [`Snapshot::background`]).
    pub(crate) background: bool,
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

pub(crate) fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
    let flag = if on { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
    fcntl(fd, FcntlArg::F_SETFD(flag)).map(|_| ())
}

/// `takeoverd --upgrade-check`: the line a running takeoverd reads from a
/// candidate binary before it execs it.
pub fn print_check() {
    println!("{CHECK_LINE} {STATE_VERSION} {}", env!("CARGO_PKG_VERSION"));
    println!("{READS_LINE} {}", READS.map(|v| v.to_string()).join(" "));
}

/// Runs `exe --upgrade-check`: `Ok(version)` if it reads snapshot version
/// `writes`.
fn check_candidate(exe: &Path, writes: u32) -> Result<String, String> {
    if let Err(why) = crate::runnable::check_runnable(exe, None) {
        return Err(format!("the binary on disk cannot be run: {why} ({})", exe.display()));
    }
    let mut child = std::process::Command::new(exe)
        .arg("--upgrade-check")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("running {} --upgrade-check: {e}", exe.display()))?;
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if t0.elapsed() < CHECK_TIMEOUT => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} --upgrade-check did not answer within {CHECK_TIMEOUT:?}", exe.display()));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    let line = out.lines().next().unwrap_or_default();
    let mut words = line.strip_prefix(CHECK_LINE).map(str::split_whitespace);
    let version = words.as_mut().and_then(|w| w.next()).and_then(|v| v.parse::<u32>().ok());
    // A takeoverd from before `--workers` prints only the first line.
    let mut reads: Vec<u32> = out
        .lines()
        .find_map(|l| l.strip_prefix(READS_LINE))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    reads.extend(version);
    match version {
        Some(_) if reads.contains(&writes) && status.success() => {
            Ok(words.and_then(|mut w| w.next()).unwrap_or("?").to_string())
        }
        Some(_) => Err(format!(
            "{} reads upgrade state version{} {}, this takeoverd writes version {writes}{}: restart the \
             service instead (systemctl restart; connections survive through the fd store)",
            exe.display(),
            if reads.len() > 1 { "s" } else { "" },
            reads.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            if writes > 1 { " (several workers)" } else { "" },
        )),
        None => Err(format!(
            "{} does not look like a takeoverd that can be upgraded to ({} --upgrade-check said {line:?}, {status})",
            exe.display(),
            exe.display()
        )),
    }
}

impl Supervisor {
    /// `ctl upgrade`: execs the binary on disk in place, or answers `reply`
    /// why not (and serves on, untouched).
    pub(crate) fn upgrade(&mut self, reply: OwnedFd) {
        // The check, the snapshot, the exec and the new image taking the
        // snapshot share a core with the serving worker (pinned, or on a
        // small machine): at SCHED_IDLE they run in its idle time and the
        // worker preempts them the moment it wakes, so that its clients do
        // not notice (see takeover::priority; measured in BENCHMARKS.md,
        // section 7). The new image returns to SCHED_OTHER.
        let background = takeover::priority::idle();
        let error = self.try_upgrade(&reply, background);
        if background {
            let _ = takeover::priority::foreground();
        }
        tracing::error!("upgrade refused: {error}");
        let answer = UpgradeReply {
            ok: false,
            error: Some(error),
            pid: std::process::id(),
            from: env!("CARGO_PKG_VERSION").into(),
            to: env!("CARGO_PKG_VERSION").into(),
            took_ms: 0.0,
            worker_pid: self.first_serving_pid(),
            connections: self.conns.len(),
        };
        crate::control_server::reply(&reply, &answer);
    }

    /// Returns only if the upgrade did not happen: why.
    fn try_upgrade(&mut self, reply: &OwnedFd, background: bool) -> String {
        let began_ms = now_ms();
        if self.resize.is_some() {
            return "the number of workers is changing (ctl workers); upgrade once it is done".into();
        }
        if self.parked() > 0 {
            return format!(
                "{} connections are parked past --max-open-connections, which an upgrade cannot carry yet; \
                 restart takeoverd instead, or raise --max-open-connections",
                self.parked()
            );
        }
        for slot in &self.slots {
            let Who::Serving(w) = &slot.who else {
                return match &slot.who {
                    Who::Handoff(_) => "a reload is in progress; upgrade once it is done".into(),
                    _ => "a worker is being restarted; upgrade once every worker serves".into(),
                };
            };
            if !w.drained() {
                return "takeoverd is still sending to a worker (a burst of new connections); try again".into();
            }
        }
        let exe = self.cfg.exe.clone();
        let writes = if self.slots.len() > 1 { 2 } else { STATE_VERSION };
        let to = match check_candidate(&exe, writes) {
            Ok(v) => v,
            Err(why) => return why,
        };
        tracing::info!(
            binary = %exe.display(),
            from = %env!("CARGO_PKG_VERSION"),
            %to,
            sched_idle = background,
            "upgrading takeoverd in place"
        );
        let (snapshot_fd, carried, named) = match self.snapshot(reply, began_ms, background) {
            Ok(s) => s,
            Err(e) => return format!("writing the upgrade snapshot: {e}"),
        };
        // The snapshot's fd, then the previous binary's: should the new
        // image not even read the snapshot, it still knows where to go back.
        let (snapshot, fallback) = (snapshot_fd.as_raw_fd(), carried[0].as_raw_fd());
        let env = exec_env(&[(SNAPSHOT_ENV, format!("{snapshot},{fallback}"))], &[FALLBACK_ENV]);
        let target = if crate::fault::fail_at(crate::fault::Step::UpgradeExec) {
            PathBuf::from("/nonexistent/takeoverd (TAKEOVERD_FAULT)")
        } else {
            exe.clone()
        };
        crate::fault::at(crate::fault::Step::UpgradeExec, None, None);
        let err = {
            let mut all = self.held_fds();
            all.extend(carried.iter().map(|f| f.as_fd()));
            all.push(reply.as_fd());
            // What the exec leaves open must be exactly what the snapshot
            // names (else the new image would miss an fd and fall back).
            let mut open: Vec<RawFd> = all.iter().map(|fd| fd.as_raw_fd()).collect();
            let mut named = named;
            open.sort_unstable();
            named.sort_unstable();
            if open != named {
                return "the fds to carry differ from those the snapshot names (a bug: please report it)".into();
            }
            all.push(snapshot_fd.as_fd());
            match all.iter().find_map(|fd| set_cloexec(*fd, false).err().map(|e| (fd.as_raw_fd(), e))) {
                Some((raw, e)) => {
                    restore_cloexec(&all);
                    return format!("preparing fd {raw} for the exec: {e}");
                }
                None => {
                    notify(&[
                        NotifyState::Reloading,
                        monotonic_usec(),
                        NotifyState::ExtendTimeoutUsec(extend_usec(self.cfg.ack_timeout)),
                        NotifyState::Status("upgrading takeoverd in place"),
                    ]);
                    let err = exec(&target, &env);
                    // Still here: nothing changed. Serve on.
                    restore_cloexec(&all);
                    err
                }
            }
        };
        drop(carried);
        self.publish_ready();
        format!("executing {}: {err}", target.display())
    }

    /// Writes the snapshot memfd; also returns the fds it opened for the
    /// exec (the previous binary) beside everything the supervisor holds,
    /// and the numbers of every fd it names.
    fn snapshot(
        &self,
        reply: &OwnedFd,
        began_ms: f64,
        background: bool,
    ) -> anyhow::Result<(OwnedFd, Vec<OwnedFd>, Vec<RawFd>)> {
        let mut carried = Vec::new();
        for slot in &self.slots {
            let Who::Serving(w) = &slot.who else { anyhow::bail!("not every worker serves") };
            carried.push(CarriedWorker {
                pid: w.pid(),
                chan: w.chan().as_raw_fd(),
                stderr: w.proc.stderr_pipe().as_raw_fd(),
                proto: w.proto.number(),
                served_ms: w.serving_since.map_or(0, |t| t.elapsed().as_millis() as u64),
            });
        }
        let worker = carried.remove(0);
        let several = !carried.is_empty();
        let fallback: OwnedFd = std::fs::File::open("/proc/self/exe")?.into();
        let conns: Vec<(&String, &crate::workers::HeldConn)> = self.conns.iter().collect();
        let snap = Snapshot {
            version: if several { 2 } else { STATE_VERSION },
            from: env!("CARGO_PKG_VERSION").into(),
            began_ms,
            generation: self.generation,
            listeners: self.listeners.iter().map(|l| (l.name.clone(), l.fd.as_raw_fd(), l.addr.clone())).collect(),
            conns: conns
                .iter()
                .filter_map(|(n, c)| Some(((*n).clone(), c.open_fd()?.as_raw_fd(), c.state.clone())))
                .collect(),
            slots: if several { conns.iter().map(|(_, c)| c.slot).collect() } else { Vec::new() },
            state: self.state.fd().as_raw_fd(),
            ctl: (self.ctl.as_fd().as_raw_fd(), self.ctl.path().to_owned()),
            reply: reply.as_raw_fd(),
            store: self.store.snapshot(),
            worker,
            others: carried,
            retiring: self.retiring.iter().filter(|(_, h)| !h.is_finished()).map(|(pid, _)| *pid).collect(),
            reloads: self.reloads.iter().cloned().collect(),
            restarts: self.restarts,
            upgrades: self.upgrades,
            fallback: fallback.as_raw_fd(),
            background,
        };
        let memfd = nix::sys::memfd::memfd_create(c"takeoverd-upgrade", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let mut file = std::fs::File::from(memfd);
        serde_json::to_writer(&mut file, &snap)?;
        let named = snap.carried().into_iter().map(|(raw, _, _)| raw).collect();
        Ok((file.into(), vec![fallback], named))
    }

    /// Every fd the supervisor holds that the snapshot names.
    fn held_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut out: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        out.extend(self.conns.values().filter_map(|c| c.open_fd()));
        out.push(self.state.fd());
        out.push(self.ctl.as_fd());
        out.extend(self.store.pair_fds());
        for slot in &self.slots {
            if let Who::Serving(w) = &slot.who {
                out.push(w.chan());
                out.push(w.proc.stderr_pipe());
            }
        }
        out
    }

    /// A new image: answers `ctl upgrade`, tells systemd, logs.
    pub(crate) fn finish_upgrade(&mut self, up: Upgraded) {
        let took_ms = now_ms() - up.began_ms;
        if up.background {
            if let Err(e) = takeover::priority::foreground() {
                tracing::warn!("returning to SCHED_OTHER and nice 0 after the upgrade: {e}");
            }
        }
        self.upgrades += 1;
        let fell_back = up
            .fell_back
            .as_ref()
            .map(|why| format!("the new binary could not take over ({why}); the previous binary serves again"));
        let answer = UpgradeReply {
            ok: fell_back.is_none(),
            error: fell_back.clone(),
            pid: std::process::id(),
            from: up.from.clone(),
            to: env!("CARGO_PKG_VERSION").into(),
            took_ms,
            worker_pid: self.first_serving_pid(),
            connections: self.conns.len(),
        };
        match &fell_back {
            None => tracing::info!(
                from = %up.from,
                to = %env!("CARGO_PKG_VERSION"),
                took_ms = %format!("{took_ms:.2}"),
                connections = self.conns.len(),
                "upgraded in place; the worker served throughout"
            ),
            Some(why) => tracing::error!("upgrade failed: {why}"),
        }
        crate::control_server::reply(&up.reply, &answer);
        // The previous image's last WATCHDOG=1 may be up to half the
        // watchdog interval old: ping at once rather than a full half later.
        notify(&[NotifyState::Watchdog]);
        self.publish_ready();
    }
}

fn restore_cloexec(fds: &[BorrowedFd<'_>]) {
    for fd in fds {
        let _ = set_cloexec(*fd, true);
    }
}

/// Our environment, without `LISTEN_*` (they described our first start) and
/// `drop`, plus `add`.
pub(crate) fn exec_env(add: &[(&str, String)], drop: &[&str]) -> Vec<CString> {
    let skip = |k: &std::ffi::OsStr| {
        let k = k.as_bytes();
        k.starts_with(b"LISTEN_")
            || add.iter().any(|(a, _)| a.as_bytes() == k)
            || drop.iter().any(|d| d.as_bytes() == k)
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !skip(k))
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.extend(add.iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()));
    env
}

/// Our own command line, for the exec.
pub(crate) fn exec_args() -> Vec<CString> {
    std::env::args_os().filter_map(|a| CString::new(a.as_bytes()).ok()).collect()
}

/// execve(2); returns only on failure.
fn exec(path: &Path, env: &[CString]) -> nix::Error {
    let Ok(p) = CString::new(path.as_os_str().as_bytes()) else { return nix::Error::EINVAL };
    match nix::unistd::execve(&p, &exec_args(), env) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
