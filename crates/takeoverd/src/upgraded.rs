//! The new image of a `ctl upgrade` (see `upgrade.rs`): it takes the
//! snapshot its predecessor left, every fd checked to be what the snapshot
//! says, and becomes the supervisor with the worker still serving; or, if
//! it cannot, it executes the previous binary (kept open across the exec)
//! with the same snapshot.

use std::os::fd::{AsFd, IntoRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::supervisor::{Config, HeldListener, Supervisor};
use crate::upgrade::{exec_args, exec_env, set_cloexec, Snapshot, Upgraded, FALLBACK_ENV, READS, SNAPSHOT_ENV};
use crate::workers::{HeldConn, Proto, Who, Worker};

/// In a new image: the snapshot its predecessor left, if this start is an
/// upgrade, taken into a supervisor. If the snapshot cannot be taken, the
/// previous binary is exec'd with it (this function does not return then);
/// if this image *is* that fallback and still cannot, an error (takeoverd
/// exits; systemd restarts it with everything from the fd store).
pub fn resume(mut cfg: Config) -> anyhow::Result<Option<Supervisor>> {
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
        conns: snap
            .conns
            .into_iter()
            .enumerate()
            .map(|(i, (name, fd, state))| {
                let slot = snap.slots.get(i).copied().unwrap_or(0);
                (name, HeldConn { fd: Some(take(fd)), state, slot })
            })
            .collect(),
        store: crate::fdstore::FdStore::from_snapshot(snap.store, &mut take),
        state: crate::state::StateFile::from_fd(take(snap.state)),
        generation: snap.generation,
    };
    let ctl = takeover::Endpoint::inherit(take(snap.ctl.0), &snap.ctl.1)?;
    let reply = take(snap.reply);
    let carried: Vec<_> = [snap.worker].into_iter().chain(snap.others).collect();
    if cfg.workers != carried.len() {
        tracing::warn!(
            workers = carried.len(),
            "the previous image ran {} workers, this one was started for {}: keeping {}",
            carried.len(),
            cfg.workers,
            carried.len()
        );
        cfg.workers = carried.len();
    }
    let mut procs = Vec::new();
    for w in carried {
        procs.push((crate::worker::WorkerProc::adopt(w.pid, take(w.chan), take(w.stderr))?, w.proto, w.served_ms));
    }
    let mut sup = Supervisor::assemble(cfg, poll, signals, ctl, restored)?;
    for (slot, (proc, proto, served_ms)) in procs.into_iter().enumerate() {
        let token = sup.worker_token();
        let mut worker = Worker::new(proc, token);
        worker.proto = Proto::of(proto).unwrap_or(Proto::V2);
        worker.serving_since = Some(Instant::now() - Duration::from_millis(served_ms));
        sup.watch(&worker);
        sup.slots[slot].who = Who::Serving(worker);
        sup.slots[slot].generation = snap.generation;
    }
    sup.reloads = snap.reloads.into();
    sup.restarts = snap.restarts;
    sup.upgrades = snap.upgrades;
    sup.ready_sent = true;
    for pid in snap.retiring {
        let grace = sup.cfg.ack_timeout;
        sup.reap_in_background(pid, crate::worker_channel::Reaped::Retired, move || {
            crate::worker::finish_pid(pid, grace)
        });
    }
    sup.upgraded =
        Some(Upgraded { reply, from: snap.from, began_ms: snap.began_ms, fell_back, background: snap.background });
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
    let mut problem = None;
    for (raw, kind, what) in snap.carried() {
        // Take each even after a problem: they all go back to the fallback.
        match takeover::take_raw_inherited(raw) {
            Ok(fd) => {
                let bad = kind.and_then(|kind| takeover::validate(fd.as_fd(), kind).err());
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
    if !READS.contains(&snap.version) {
        problem.get_or_insert(format!("snapshot version {} (this binary reads {READS:?})", snap.version));
    }
    problem.map_or(Ok(()), Err)
}
