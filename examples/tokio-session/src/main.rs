//! `session-worker`: a tokio service with per-connection state that runs
//! under takeoverd, built on the `takeover::worker` library. Its protocol
//! is in `session.rs`; this file is the part every tokio service under
//! takeoverd has: the channel to takeoverd as an `AsyncFd`, connections that
//! arrive as fds and become tokio `TcpStream`s, one task per connection, and
//! a stop at a request boundary.
//!
//! Crash safety comes from one rule, *peek, tell, reply, consume*: a request
//! stays in the kernel's receive queue (read with `MSG_PEEK`) until its reply
//! is written, and the new state (with the reply) is told to takeoverd
//! before the reply goes out. Whoever serves the connection next, after a
//! reload or a crash, finds the request still queued if it was not
//! finished, and the state says whether it already ran.
//!
//! Without `$TAKEOVERD_FD` it serves on its own (`--listen ADDR`), for
//! trying the protocol.

mod session;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recv, shutdown, MsgFlags, Shutdown};
use serde_json::value::to_raw_value;
use takeover::worker::{Assigned, Event, Supervisor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{watch, RwLock};

use session::{Outcome, Session};

/// The longest request line, newline included.
const MAX_LINE: usize = 1024;

/// Whether connection tasks may read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Staged beside a worker that serves: hold the connections, read nothing.
    Held,
    /// Serve.
    Serving,
    /// Stopped for a handoff: read nothing, write nothing.
    Stopped,
}

/// One connection.
#[derive(Debug)]
struct Conn {
    name: String,
    stream: TcpStream,
    session: Mutex<Session>,
}

/// What the control task and the connection tasks share.
#[derive(Debug)]
struct Shared {
    /// The channel to takeoverd; `None` when serving on our own.
    sup: Option<AsyncFd<Supervisor>>,
    mode: watch::Sender<Mode>,
    /// A request being handled holds this shared; a stop takes it
    /// exclusively, so it waits for every request in progress.
    turn: RwLock<()>,
    conns: Mutex<HashMap<String, (Arc<Conn>, tokio::task::AbortHandle)>>,
}

impl Shared {
    fn sup(&self) -> Option<&Supervisor> {
        self.sup.as_ref().map(AsyncFd::get_ref)
    }
}

fn main() -> std::process::ExitCode {
    takeover::log::init("session-worker");
    let listen = match parse_args() {
        Ok(l) => l,
        Err(msg) => {
            eprintln!("{msg}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let code = rt.block_on(async {
        match Supervisor::from_env() {
            Ok(Some(sup)) => under_takeoverd(sup).await,
            Ok(None) => on_our_own(&listen).await,
            Err(e) => {
                tracing::error!("taking takeoverd's channel: {e}");
                1
            }
        }
    });
    std::process::ExitCode::from(code)
}

fn parse_args() -> Result<String, String> {
    let usage = "usage: session-worker [--listen ADDR:PORT]\n\n\
        A line protocol with per-connection state (see examples/tokio-session/README.md).\n\
        Under takeoverd ($TAKEOVERD_FD set) it serves what takeoverd assigns and ignores --listen;\n\
        on its own it binds --listen (default 127.0.0.1:1235).";
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:1235".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().ok_or(usage)?,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{usage}")),
        }
    }
    Ok(listen)
}

/// Serves what takeoverd assigns until it says `exit` (0) or goes away (1).
async fn under_takeoverd(sup: Supervisor) -> u8 {
    let chan = match AsyncFd::with_interest(sup, Interest::READABLE) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("registering takeoverd's channel: {e}");
            return 1;
        }
    };
    let (mode, _) = watch::channel(Mode::Held);
    let shared = Arc::new(Shared { sup: Some(chan), mode, turn: RwLock::new(()), conns: Mutex::new(HashMap::new()) });
    let chan = shared.sup.as_ref().expect("under takeoverd");
    loop {
        let mut ready = match chan.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("waiting on takeoverd's channel: {e}");
                return 1;
            }
        };
        loop {
            match chan.get_ref().next_event() {
                Ok(None) => break,
                Ok(Some(event)) => {
                    if let Some(code) = on_event(&shared, event).await {
                        return code;
                    }
                }
                Err(e) => {
                    // The library told takeoverd (nack); it holds every connection.
                    tracing::error!("takeoverd's channel: {e}; exiting");
                    return 1;
                }
            }
        }
        ready.clear_ready();
    }
}

/// Does what takeoverd asks; `Some(code)` to exit.
async fn on_event(shared: &Arc<Shared>, event: Event) -> Option<u8> {
    let sup = shared.sup().expect("under takeoverd");
    let told = match event {
        Event::Assign(conns) => {
            for Assigned { name, state, fd } in conns {
                let session = state.and_then(|s| serde_json::from_str(s.get()).ok()).unwrap_or_default();
                if let Err(e) = adopt(shared, name.clone(), std::net::TcpStream::from(fd), session) {
                    let reason = format!("cannot take connection {name}: {e}");
                    tracing::error!("{reason}; exiting (takeoverd holds it)");
                    let _ = sup.nack(&reason);
                    return Some(1);
                }
            }
            Ok(())
        }
        Event::Release(names) => {
            let mut conns = shared.conns.lock().expect("not poisoned");
            for name in names {
                // Ended before we served it: close our copy, no shutdown.
                if let Some((_, task)) = conns.remove(&name) {
                    task.abort();
                }
            }
            Ok(())
        }
        Event::Sync => sup.ready(shared.conns.lock().expect("not poisoned").len()),
        Event::State(entries) => {
            let conns = shared.conns.lock().expect("not poisoned");
            for e in entries {
                if let Some((conn, _)) = conns.get(&e.name) {
                    // `null` clears, as for any connection back at a boundary.
                    *conn.session.lock().expect("not poisoned") = serde_json::from_value(e.state).unwrap_or_default();
                }
            }
            Ok(())
        }
        // Every task peeks its connection as soon as serving starts, so
        // connections with work left are served without being named.
        Event::Wake(_) => Ok(()),
        // This worker speaks version 2 (`Supervisor::from_env`): takeoverd
        // never asks it to give connections back (`ctl workers N` moves
        // them with a stop instead), and the library refuses a `give`.
        Event::Give(_) => Ok(()),
        // `recovered` needs nothing more: requests stay in the kernel until
        // answered, and the state says whether the one queued already ran.
        Event::Serve { recovered } => {
            shared.mode.send_replace(Mode::Serving);
            let count = shared.conns.lock().expect("not poisoned").len();
            tracing::info!(connections = count, recovered, "serving for takeoverd");
            sup.serving(count)
        }
        Event::Stop => {
            shared.mode.send_replace(Mode::Stopped);
            // Every request in progress finishes (its state told, its reply
            // written, its line consumed); then nothing moves.
            let _all = shared.turn.write().await;
            let wake: Vec<String> = shared
                .conns
                .lock()
                .expect("not poisoned")
                .iter()
                .filter(|(_, (c, _))| input_waiting(c.stream.as_raw_fd()))
                .map(|(name, _)| name.clone())
                .collect();
            tracing::info!(wake = wake.len(), "stopped for a handoff");
            // Every state was told as it changed: no `state` to add.
            sup.stopped(&[], &wake)
        }
        Event::Resume => {
            tracing::info!("handoff abandoned by takeoverd; serving again");
            shared.mode.send_replace(Mode::Serving);
            Ok(())
        }
        Event::Exit => {
            tracing::info!("handed over; exiting");
            // The kernel closes every fd, without a shutdown: the successor serves them.
            return Some(0);
        }
        Event::Gone => {
            tracing::error!("takeoverd went away; exiting without touching the connections");
            return Some(1);
        }
    };
    match told {
        Ok(()) => None,
        Err(e) => {
            tracing::error!("telling takeoverd: {e}; exiting (takeoverd holds every connection)");
            Some(1)
        }
    }
}

/// Makes `stream` a tokio connection with its task; the task reads only
/// while the mode is `Serving`.
fn adopt(shared: &Arc<Shared>, name: String, stream: std::net::TcpStream, session: Session) -> io::Result<()> {
    stream.set_nonblocking(true)?;
    let conn =
        Arc::new(Conn { name: name.clone(), stream: TcpStream::from_std(stream)?, session: Mutex::new(session) });
    let task = tokio::spawn(serve(shared.clone(), conn.clone())).abort_handle();
    shared.conns.lock().expect("not poisoned").insert(name, (conn, task));
    Ok(())
}

/// A connection's task: one request at a time, only while serving.
async fn serve(shared: Arc<Shared>, conn: Arc<Conn>) {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; MAX_LINE];
    loop {
        if mode.wait_for(|m| *m == Mode::Serving).await.is_err() {
            return;
        }
        let peeked = tokio::select! {
            p = next_request(&conn.stream, &mut buf) => p,
            _ = mode.wait_for(|m| *m != Mode::Serving) => continue,
        };
        let _turn = shared.turn.read().await;
        if *mode.borrow() != Mode::Serving {
            continue; // a stop came first: the request stays queued for whoever serves next
        }
        let result = match peeked {
            Ok(Some(len)) => handle(&shared, &conn, &buf[..len]).await,
            Ok(None) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the client")),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::debug!(name = %conn.name, "ending the connection: {e}");
            end(&shared, &conn);
            return;
        }
    }
}

/// Waits until a whole request line is queued and returns its length with
/// the newline (the bytes peeked into `buf`, still queued); `None` at the
/// end of the stream.
async fn next_request(stream: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        stream.readable().await?;
        // A partial line clears the readiness (WouldBlock) so that we wait
        // for more bytes instead of peeking again at once; tokio keeps any
        // readiness that came meanwhile.
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = recv(stream.as_raw_fd(), buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)?;
            if n == 0 {
                return Ok(None);
            }
            match buf[..n].iter().position(|b| *b == b'\n') {
                Some(end) => Ok(Some(end + 1)),
                None if n == buf.len() => Err(io::Error::new(io::ErrorKind::InvalidData, "request line too long")),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Peek, tell, reply, consume: see the top of this file.
async fn handle(shared: &Shared, conn: &Conn, line: &[u8]) -> io::Result<()> {
    let text = String::from_utf8_lossy(&line[..line.len() - 1]);
    let (reply, state) = {
        let mut session = conn.session.lock().expect("not poisoned");
        match session.handle(&text) {
            Outcome::Ran(reply) => (reply, Some(to_raw_value(&*session).expect("a session serialises"))),
            Outcome::Answered(reply) => (reply, None),
        }
    };
    if let (Some(sup), Some(state)) = (shared.sup(), state) {
        sup.state(&[(conn.name.clone(), state)]).map_err(io::Error::other)?;
    }
    let mut out = reply.as_bytes();
    while !out.is_empty() {
        conn.stream.writable().await?;
        match conn.stream.try_write(out) {
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    // The line is still queued (peeked): consume exactly it.
    let mut sink = [0u8; MAX_LINE];
    let n = recv(conn.stream.as_raw_fd(), &mut sink[..line.len()], MsgFlags::MSG_DONTWAIT)?;
    debug_assert_eq!(n, line.len(), "a peeked line is consumed whole");
    Ok(())
}

/// Ends a connection: shutdown (takeoverd holds a copy, so a plain close
/// would not reach the client), close, and tell takeoverd.
fn end(shared: &Shared, conn: &Conn) {
    let _ = shutdown(conn.stream.as_raw_fd(), Shutdown::Both);
    shared.conns.lock().expect("not poisoned").remove(&conn.name);
    if let Some(sup) = shared.sup() {
        if let Err(e) = sup.closed(&conn.name) {
            tracing::warn!(name = %conn.name, "telling takeoverd about a closed connection: {e}");
        }
    }
}

/// Whether bytes (or the end of the stream) wait in the receive queue.
fn input_waiting(fd: RawFd) -> bool {
    let mut byte = [0u8; 1];
    recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).is_ok()
}

/// Development: serve on our own, no takeoverd, no handoff.
async fn on_our_own(listen: &str) -> u8 {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("binding {listen}: {e}");
            return 1;
        }
    };
    tracing::info!(%listen, "serving on our own (not under takeoverd)");
    let (mode, _) = watch::channel(Mode::Serving);
    let shared = Arc::new(Shared { sup: None, mode, turn: RwLock::new(()), conns: Mutex::new(HashMap::new()) });
    for n in 0u64.. {
        match listener.accept().await {
            Ok((stream, _)) => match stream.into_std() {
                Ok(std) => {
                    if let Err(e) = adopt(&shared, format!("s{n}"), std, Session::default()) {
                        tracing::warn!("dropping a new connection: {e}");
                    }
                }
                Err(e) => tracing::warn!("dropping a new connection: {e}"),
            },
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    0
}
