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
//! Nothing is lost on any failure: before the exec nothing has changed;
//! after it, the previous binary takes the same snapshot; should that fail
//! too (or either image die), takeoverd exits, its workers see their
//! channel end and exit, and systemd restarts takeoverd with everything
//! from the fd store (without systemd, that last case loses the
//! connections, as a crash of takeoverd always does).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::fdstore::{extend_usec, monotonic_usec, notify, StoreSnapshot};
use crate::supervisor::{Config, HeldListener, Supervisor};
use crate::workers::{HeldConn, Proto, Worker, Workers};
use takeoverd::status::{ReloadRecord, UpgradeReply};

/// The version of the snapshot this build writes and reads. A binary that
/// reads another version is refused before anything changes.
pub const STATE_VERSION: u32 = 1;

/// Names the snapshot memfd in the new image's environment.
const SNAPSHOT_ENV: &str = "TAKEOVERD_UPGRADE_FD";
/// Set when the new image could not take the snapshot and handed it back to
/// the previous binary: that one must not fall back again.
const FALLBACK_ENV: &str = "TAKEOVERD_UPGRADE_FALLBACK";
/// What `takeoverd --upgrade-check` prints before its version.
pub const CHECK_LINE: &str = "takeoverd upgrade-state";
/// How long the candidate binary may take to answer `--upgrade-check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a new image needs, by fd number (fds keep their numbers
/// across `execve`).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    /// The previous image's package version, for the log and the reply.
    from: String,
    /// When the upgrade began (Unix time, ms), to report how long it took.
    began_ms: f64,
    generation: u64,
    listeners: Vec<(String, RawFd, String)>,
    conns: Vec<(String, RawFd, Option<Box<RawValue>>)>,
    state: RawFd,
    ctl: (RawFd, PathBuf),
    /// The control connection that asked for the upgrade.
    reply: RawFd,
    store: StoreSnapshot,
    worker: CarriedWorker,
    /// Workers told to exit and not reaped yet.
    retiring: Vec<u32>,
    reloads: Vec<ReloadRecord>,
    restarts: u64,
    upgrades: u64,
    /// The previous image's binary, open: where to go back to.
    fallback: RawFd,
}

#[derive(Debug, Serialize, Deserialize)]
struct CarriedWorker {
    pid: u32,
    chan: RawFd,
    stderr: RawFd,
    /// Its channel version (1 or 2).
    proto: u32,
    /// How long it has served, in ms.
    served_ms: u64,
}

/// Set in a new image: what to report once it serves.
#[derive(Debug)]
pub struct Upgraded {
    reply: OwnedFd,
    from: String,
    began_ms: f64,
    /// The new binary failed to take the snapshot; this is the previous one again.
    fell_back: Option<String>,
}

/// One fd to carry, and what it must be on the other side.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Socket(takeover::Kind),
    File,
    Any,
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
    let flag = if on { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
    fcntl(fd, FcntlArg::F_SETFD(flag)).map(|_| ())
}

/// `takeoverd --upgrade-check`: the line a running takeoverd reads from a
/// candidate binary before it execs it.
pub fn print_check() {
    println!("{CHECK_LINE} {STATE_VERSION} {}", env!("CARGO_PKG_VERSION"));
}

/// Runs `exe --upgrade-check`: `Ok(version)` if it reads our snapshot.
fn check_candidate(exe: &Path) -> Result<String, String> {
    if let Err(why) = crate::worker::check_runnable(exe, None) {
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
    match version {
        Some(v) if v == STATE_VERSION && status.success() => {
            Ok(words.and_then(|mut w| w.next()).unwrap_or("?").to_string())
        }
        Some(v) => Err(format!(
            "{} reads upgrade state version {v}, this takeoverd writes version {STATE_VERSION}: restart the \
             service instead (systemctl restart; connections survive through the fd store)",
            exe.display()
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
        let error = self.try_upgrade(&reply);
        tracing::error!("upgrade refused: {error}");
        let answer = UpgradeReply {
            ok: false,
            error: Some(error),
            pid: std::process::id(),
            from: env!("CARGO_PKG_VERSION").into(),
            to: env!("CARGO_PKG_VERSION").into(),
            took_ms: 0.0,
            worker_pid: self.workers.serving().map(Worker::pid),
            connections: self.conns.len(),
        };
        crate::control_server::reply(&reply, &answer);
    }

    /// Returns only if the upgrade did not happen: why.
    fn try_upgrade(&mut self, reply: &OwnedFd) -> String {
        let began_ms = now_ms();
        let Workers::Serving(w) = &self.workers else {
            return match &self.workers {
                Workers::Handoff(_) => "a reload is in progress; upgrade once it is done".into(),
                _ => "no worker serves (one is being restarted); upgrade once one serves".into(),
            };
        };
        if !w.drained() {
            return "takeoverd is still sending to the worker (a burst of new connections); try again".into();
        }
        let exe = self.cfg.exe.clone();
        let to = match check_candidate(&exe) {
            Ok(v) => v,
            Err(why) => return why,
        };
        tracing::info!(binary = %exe.display(), from = %env!("CARGO_PKG_VERSION"), %to, "upgrading takeoverd in place");
        let (snapshot_fd, carried) = match self.snapshot(reply, began_ms) {
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
            all.push(snapshot_fd.as_fd());
            all.push(reply.as_fd());
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
    /// exec (the previous binary) beside everything the supervisor holds.
    fn snapshot(&self, reply: &OwnedFd, began_ms: f64) -> anyhow::Result<(OwnedFd, Vec<OwnedFd>)> {
        let Workers::Serving(w) = &self.workers else { anyhow::bail!("no worker serves") };
        let fallback: OwnedFd = std::fs::File::open("/proc/self/exe")?.into();
        let snap = Snapshot {
            version: STATE_VERSION,
            from: env!("CARGO_PKG_VERSION").into(),
            began_ms,
            generation: self.generation,
            listeners: self.listeners.iter().map(|l| (l.name.clone(), l.fd.as_raw_fd(), l.addr.clone())).collect(),
            conns: self.conns.iter().map(|(n, c)| (n.clone(), c.fd.as_raw_fd(), c.state.clone())).collect(),
            state: self.state.fd().as_raw_fd(),
            ctl: (self.ctl.as_fd().as_raw_fd(), self.ctl.path().to_owned()),
            reply: reply.as_raw_fd(),
            store: self.store.snapshot(),
            worker: CarriedWorker {
                pid: w.pid(),
                chan: w.chan().as_raw_fd(),
                stderr: w.proc.stderr_pipe().as_raw_fd(),
                proto: if w.proto == Proto::V1 { 1 } else { 2 },
                served_ms: w.serving_since.map_or(0, |t| t.elapsed().as_millis() as u64),
            },
            retiring: self.retiring.iter().filter(|(_, h)| !h.is_finished()).map(|(pid, _)| *pid).collect(),
            reloads: self.reloads.iter().cloned().collect(),
            restarts: self.restarts,
            upgrades: self.upgrades,
            fallback: fallback.as_raw_fd(),
        };
        let memfd = nix::sys::memfd::memfd_create(c"takeoverd-upgrade", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let mut file = std::fs::File::from(memfd);
        serde_json::to_writer(&mut file, &snap)?;
        Ok((file.into(), vec![fallback]))
    }

    /// Every fd the supervisor holds that the snapshot names.
    fn held_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut out: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        out.extend(self.conns.values().map(|c| c.fd.as_fd()));
        out.push(self.state.fd());
        out.push(self.ctl.as_fd());
        out.extend(self.store.pair_fds());
        if let Workers::Serving(w) = &self.workers {
            out.push(w.chan());
            out.push(w.proc.stderr_pipe());
        }
        out
    }

    /// A new image: answers `ctl upgrade`, tells systemd, logs.
    pub(crate) fn finish_upgrade(&mut self, up: Upgraded) {
        let took_ms = now_ms() - up.began_ms;
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
            worker_pid: self.workers.serving().map(Worker::pid),
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
fn exec_env(add: &[(&str, String)], drop: &[&str]) -> Vec<CString> {
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
fn exec_args() -> Vec<CString> {
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

/// In a new image: the snapshot its predecessor left, if this start is an
/// upgrade, taken into a supervisor. If the snapshot cannot be taken, the
/// previous binary is exec'd with it (this function does not return then);
/// if this image *is* that fallback and still cannot, an error (takeoverd
/// exits; systemd restarts it with everything from the fd store).
pub fn resume(cfg: Config) -> anyhow::Result<Option<Supervisor>> {
    let Ok(var) = std::env::var(SNAPSHOT_ENV) else { return Ok(None) };
    let fell_back = std::env::var(FALLBACK_ENV).ok();
    let Some((raw, fallback_raw)) = var.split_once(',').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
    else {
        anyhow::bail!(
            "${SNAPSHOT_ENV}={var:?} is not SNAPSHOT_FD,BINARY_FD; exiting so that systemd restarts takeoverd"
        );
    };
    let memfd = match takeover::take_raw_inherited(raw) {
        Ok(fd) => fd,
        Err(e) => {
            let problem = format!("the upgrade snapshot's fd {raw} did not come across ({e})");
            return Err(fall_back(Err(fallback_raw), &var, fell_back.is_some(), problem, Vec::new()));
        }
    };
    let read = || -> anyhow::Result<Snapshot> {
        let mut file = std::fs::File::from(memfd.try_clone()?);
        let mut text = String::new();
        std::io::Seek::rewind(&mut file)?;
        std::io::Read::read_to_string(&mut file, &mut text)?;
        Ok(serde_json::from_str(&text)?)
    };
    let snap: Snapshot = match read() {
        Ok(s) => s,
        Err(e) => {
            let problem = format!("the upgrade snapshot is unreadable ({e})");
            return Err(fall_back(Err(fallback_raw), &var, fell_back.is_some(), problem, vec![memfd]));
        }
    };
    crate::fault::at(crate::fault::Step::UpgradeRestore, None, None);
    // Take every fd now (each is checked to be open), then check each is
    // what the snapshot says. On any failure, hand everything back as it
    // came (open across exec) to the previous binary.
    let mut taken: std::collections::HashMap<RawFd, OwnedFd> = std::collections::HashMap::new();
    let problem = take_all(&snap, &mut taken).err().or_else(|| {
        crate::fault::fail_at(crate::fault::Step::UpgradeRestore).then(|| "TAKEOVERD_FAULT upgrade-restore".into())
    });
    if let Some(problem) = problem {
        let binary = taken.remove(&snap.fallback).ok_or(snap.fallback);
        let keep: Vec<OwnedFd> = taken.into_values().chain([memfd]).collect();
        return Err(fall_back(binary, &var, fell_back.is_some(), problem, keep));
    }
    drop(taken.remove(&snap.fallback));
    drop(memfd);
    let mut take = |n: RawFd| taken.remove(&n).expect("every fd of the snapshot was taken");
    let (poll, signals) = crate::supervisor::event_basics()?;
    let restored = crate::restore::Restored {
        listeners: snap
            .listeners
            .into_iter()
            .map(|(name, fd, addr)| HeldListener { name, fd: take(fd), addr })
            .collect(),
        conns: snap.conns.into_iter().map(|(name, fd, state)| (name, HeldConn { fd: take(fd), state })).collect(),
        store: crate::fdstore::FdStore::from_snapshot(snap.store, &mut take),
        state: crate::state::StateFile::from_fd(take(snap.state)),
        generation: snap.generation,
    };
    let ctl = takeover::Endpoint::inherit(take(snap.ctl.0), &snap.ctl.1)?;
    let reply = take(snap.reply);
    let w = snap.worker;
    let proc = crate::worker::WorkerProc::adopt(w.pid, take(w.chan), take(w.stderr))?;
    let mut sup = Supervisor::assemble(cfg, poll, signals, ctl, restored)?;
    let token = sup.worker_token();
    let mut worker = Worker::new(proc, token);
    worker.proto = if w.proto == 1 { Proto::V1 } else { Proto::V2 };
    worker.serving_since = Some(Instant::now() - Duration::from_millis(w.served_ms));
    sup.watch(&worker);
    sup.workers = Workers::Serving(worker);
    sup.reloads = snap.reloads.into();
    sup.restarts = snap.restarts;
    sup.upgrades = snap.upgrades;
    sup.ready_sent = true;
    for pid in snap.retiring {
        let grace = sup.cfg.ack_timeout;
        sup.reap_in_background(pid, move || crate::worker::finish_pid(pid, grace));
    }
    sup.upgraded = Some(Upgraded { reply, from: snap.from, began_ms: snap.began_ms, fell_back });
    Ok(Some(sup))
}

/// Execs the previous image's binary (taken already, or still to take by
/// its number) with the snapshot, every fd in `keep` left open across the
/// exec. Returns only on failure, or if this image is that fallback
/// already: the error to exit with.
fn fall_back(
    binary: Result<OwnedFd, RawFd>,
    var: &str,
    already: bool,
    problem: String,
    keep: Vec<OwnedFd>,
) -> anyhow::Error {
    if already {
        return anyhow::anyhow!("the previous binary cannot take the upgrade snapshot either ({problem}); exiting");
    }
    tracing::error!("cannot take the upgrade snapshot ({problem}); going back to the previous binary");
    for fd in keep {
        let _ = set_cloexec(fd.as_fd(), false);
        let _ = fd.into_raw_fd(); // stays open across the exec, for the previous binary
    }
    let binary = match binary.or_else(takeover::take_raw_inherited) {
        Ok(fd) => fd,
        Err(e) => return anyhow::anyhow!("the previous binary's fd did not come across ({e}); exiting"),
    };
    // Open across the exec too: the snapshot names it.
    let _ = set_cloexec(binary.as_fd(), false);
    let env = exec_env(&[(SNAPSHOT_ENV, var.to_string()), (FALLBACK_ENV, problem)], &[]);
    let err = match nix::unistd::fexecve(binary.as_fd(), &exec_args(), &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    anyhow::anyhow!("executing the previous binary failed too ({err}); exiting")
}

/// Takes every fd the snapshot names into `taken` and checks what each is.
fn take_all(snap: &Snapshot, taken: &mut std::collections::HashMap<RawFd, OwnedFd>) -> Result<(), String> {
    use takeover::Kind;
    let mut want: Vec<(RawFd, Expect, String)> = Vec::new();
    for (name, fd, _) in &snap.listeners {
        want.push((*fd, Expect::Socket(Kind::TcpListener), format!("listener {name}")));
    }
    for (name, fd, _) in &snap.conns {
        want.push((*fd, Expect::Socket(Kind::TcpStream), format!("connection {name}")));
    }
    want.push((snap.state, Expect::File, "the state memfd".into()));
    want.push((snap.ctl.0, Expect::Socket(Kind::UnixSeqpacket), "the control socket".into()));
    want.push((snap.reply, Expect::Socket(Kind::UnixSeqpacket), "the upgrade's control connection".into()));
    for (r, w, _, _) in &snap.store.overflow.pairs {
        want.push((*r, Expect::Socket(Kind::UnixSeqpacket), "an overflow pair".into()));
        want.push((*w, Expect::Socket(Kind::UnixSeqpacket), "an overflow pair".into()));
    }
    want.push((snap.worker.chan, Expect::Socket(Kind::UnixSeqpacket), "the worker's channel".into()));
    want.push((snap.worker.stderr, Expect::Any, "the worker's stderr".into()));
    want.push((snap.fallback, Expect::File, "the previous binary".into()));
    let mut problem = None;
    for (raw, expect, what) in want {
        // Take each even after a problem: they all go back to the fallback.
        match takeover::take_raw_inherited(raw) {
            Ok(fd) => {
                let bad = match expect {
                    Expect::Socket(kind) => takeover::validate(fd.as_fd(), kind).err(),
                    Expect::File => takeover::validate(fd.as_fd(), Kind::File).err(),
                    Expect::Any => None,
                };
                if let (Some(bad), None) = (bad, &problem) {
                    problem = Some(format!("{what} (fd {raw}): {bad}"));
                }
                taken.insert(raw, fd);
            }
            Err(e) => {
                problem.get_or_insert(format!("{what} (fd {raw}): {e}"));
            }
        }
    }
    if snap.version != STATE_VERSION {
        problem.get_or_insert(format!("snapshot version {} (this binary reads {STATE_VERSION})", snap.version));
    }
    problem.map_or(Ok(()), Err)
}
