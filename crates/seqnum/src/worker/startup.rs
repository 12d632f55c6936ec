//! Where a worker's sockets come from.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use takeover::worker::Supervisor;
use takeover::{control::CONTROL_FD_ENV, Endpoint, Existing, Handoff, Kind};

use super::event_loop::Worker;
use super::supervised::Control;
use super::{Args, Doing, StartError};
use crate::echo::{ConnState, EchoConn};

/// How long a staged worker works at background priority at most.
const STAGING_IN_BACKGROUND: std::time::Duration = std::time::Duration::from_millis(250);

pub(super) fn start(args: &Args) -> Result<Worker, StartError> {
    let mut worker = Worker::new(args.ack_timeout())?;
    if let Some(chan) = takeover::take_env_fd(CONTROL_FD_ENV)? {
        if args.takeoverd_channel >= 2 {
            // takeoverd assigns us every connection, then tells us to serve.
            // Registering them is background work (see takeover::priority),
            // for a while: a successor that cannot keep up with a busy core
            // finishes at full priority.
            if Supervisor::staged_beside_a_server() && takeover::priority::background() {
                worker.staging_in_background = Some(Instant::now() + STAGING_IN_BACKGROUND);
            }
            // Version 3 adds `give` (takeoverd moves connections between
            // workers); 2 is kept for the tests of older workers.
            let sup = if args.takeoverd_channel >= 3 { Supervisor::new_giving(chan) } else { Supervisor::new(chan) };
            let sup = sup.doing(|| "saying hello to takeoverd".into())?.with_send_timeout(args.ack_timeout());
            worker.set_control(Control::V2(sup))?;
            return Ok(worker);
        }
        // Version 1: takeoverd hands us everything, listeners too.
        let handoff = take(&chan, args).doing(|| "receiving sockets from takeoverd".into())?;
        adopt(&mut worker, handoff)?;
        takeover::ack(chan.as_fd(), deadline(args)).doing(|| "acking takeoverd's handoff".into())?;
        worker.set_control(Control::V1(chan))?;
        tracing::info!(listeners = worker.listener_count(), connections = worker.conn_count(), "serving for takeoverd");
        return Ok(worker);
    }
    if let Some(path) = &args.takeover {
        let chan = takeover::connect(path).doing(|| format!("taking over from {}", path.display()))?;
        let handoff = take(&chan, args).doing(|| format!("taking over from {}", path.display()))?;
        adopt(&mut worker, handoff)?;
        takeover::ack(chan.as_fd(), deadline(args))
            .doing(|| format!("completing the takeover from {}", path.display()))?;
        tracing::info!(from = %path.display(), listeners = worker.listener_count(), connections = worker.conn_count(), "took over");
        let offer = args.takeover_path.as_deref().unwrap_or(path);
        let existing = if offer == path.as_path() { Existing::Succeed } else { Existing::ReplaceStale };
        worker.set_endpoint(
            Endpoint::bind(offer, existing).doing(|| format!("offering takeover on {}", offer.display()))?,
        )?;
    } else {
        let inherited = inherited_listeners()?;
        if inherited.is_empty() {
            let addr = SocketAddr::new(args.listen_address, args.listen_port);
            let l = std::net::TcpListener::from(
                takeover::bind_tcp(addr, args.listen_backlog).doing(|| format!("binding {addr}"))?,
            );
            worker.add_listener("l0".into(), l)?;
        } else {
            for (i, l) in inherited.into_iter().enumerate() {
                worker.add_listener(format!("l{i}"), l)?;
            }
        }
        if let Some(path) = &args.takeover_path {
            worker.set_endpoint(
                Endpoint::bind(path, Existing::ReplaceStale)
                    .doing(|| format!("offering takeover on {}", path.display()))?,
            )?;
        }
    }
    for (name, addr) in worker.listener_addrs() {
        tracing::info!(%name, %addr, "listening");
    }
    Ok(worker)
}

fn deadline(args: &Args) -> Option<Instant> {
    Some(Instant::now() + args.ack_timeout())
}

fn take(chan: &OwnedFd, args: &Args) -> takeover::Result<Handoff> {
    takeover::hello(chan.as_fd(), deadline(args))?;
    takeover::receive(chan.as_fd(), &takeover::Limits::default(), deadline(args))
}

/// Puts everything received into the event loop. Pending input stays in the
/// kernel (see `echo`), so there is nothing else to replay.
fn adopt(worker: &mut Worker, handoff: Handoff) -> Result<(), StartError> {
    if handoff.recovered {
        tracing::info!("the previous worker died; reconciling every connection with the kernel's byte counters");
    }
    for t in handoff.taken {
        match t.kind {
            Kind::TcpListener => worker.add_listener(t.name, std::net::TcpListener::from(t.fd))?,
            Kind::TcpStream => {
                let stream = std::net::TcpStream::from(t.fd);
                stream.set_nonblocking(true)?;
                let state: ConnState = t.state.and_then(|s| serde_json::from_str(s.get()).ok()).unwrap_or_default();
                let conn = EchoConn::adopt(mio::net::TcpStream::from_std(stream), &t.name, state, handoff.recovered)
                    .doing(|| format!("adopting connection {}", t.name))?;
                worker.add_conn(conn)?;
            }
            other => {
                return Err(StartError::new(format!(
                    "received a {other} ({}) that a seqnum worker cannot serve",
                    t.name
                )))
            }
        }
    }
    Ok(())
}

/// Listeners passed by systemd or systemfd (`LISTEN_FDS`).
fn inherited_listeners() -> Result<Vec<std::net::TcpListener>, StartError> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i).doing(|| format!("LISTEN_FDS fd {} is not a TCP listener", 3 + i))? {
            Some(l) => out.push(l),
            None => return Err(StartError::new(format!("LISTEN_FDS fd {} was already taken", 3 + i))),
        }
    }
    Ok(out)
}
