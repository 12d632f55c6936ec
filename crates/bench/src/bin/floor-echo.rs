#![forbid(unsafe_code)]
//! `floor-echo`: the floor that seqnum-bench measures takeoverd +
//! seqnum-worker against. The least a TCP echo server can do: one thread,
//! one mio (epoll, edge-triggered) loop, accept, read, write back what was
//! read. No framing, no handoff, no supervisor, no per-connection state but
//! the bytes a full send buffer could not take. Prints nothing but errors.
//!
//! ```sh
//! floor-echo --listen 127.0.0.1:1234
//! ```

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

/// A minimal single-threaded epoll TCP echo server: the benchmark's floor.
#[derive(Debug, Parser)]
#[command(name = "floor-echo", version)]
struct Args {
    /// Address and port to listen on.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
}

/// The listener's token; connections use their slab index.
const LISTENER: Token = Token(usize::MAX);

/// One connection and what a full send buffer left of an echo.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor-echo: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> io::Result<()> {
    // Thousands of connections need the hard open-file limit; the soft one
    // is enough for a few, so a failure here is not fatal.
    let _ = takeover::raise_fd_limit();
    let mut poll = Poll::new()?;
    let mut listener = listen(args.listen)?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Slab<Conn> = Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_all(&listener, poll.registry(), &mut conns);
                continue;
            }
            let k = ev.token().0;
            let hup = ev.is_read_closed() || ev.is_error();
            let open = match conns.get_mut(k) {
                Some(c) => serve(c, &mut buf, hup),
                None => continue,
            };
            if !open {
                let mut c = conns.remove(k);
                let _ = poll.registry().deregister(&mut c.stream);
            }
        }
    }
}

/// A non-blocking listener with takeoverd's backlog (4096; mio's own
/// `bind` asks for 1024, which a burst of connects overflows).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(fd)))
}

/// Accepts until the backlog is empty (edge-triggered).
fn accept_all(listener: &TcpListener, registry: &Registry, conns: &mut Slab<Conn>) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // As seqnum-worker does: an echo goes out at once.
                let _ = stream.set_nodelay(true);
                let entry = conns.vacant_entry();
                if let Err(e) =
                    registry.register(&mut stream, Token(entry.key()), Interest::READABLE | Interest::WRITABLE)
                {
                    eprintln!("floor-echo: registering a connection: {e}");
                    continue;
                }
                entry.insert(Conn { stream, pending: Vec::new() });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and the like: what is left waits in the backlog
                // for the next connection's edge.
                eprintln!("floor-echo: accept: {e}");
                return;
            }
        }
    }
}

/// Echoes what `c` has to read; false when it is to be closed (EOF or an
/// error). A read shorter than the buffer emptied the receive queue: new
/// data raises a new edge, so no read is spent on `EAGAIN` — unless the
/// event said the peer closed (`hup`): its EOF may already sit behind the
/// data and raises no new edge, so then read on until the EOF.
fn serve(c: &mut Conn, buf: &mut [u8], hup: bool) -> bool {
    loop {
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(0) => return false,
                Ok(n) => drop(c.pending.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let n = match c.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let mut written = 0;
        while written < n {
            match c.stream.write(&buf[written..n]) {
                Ok(0) => return false,
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if written < n {
            // The send buffer is full: keep the rest, stop reading until
            // the writable edge.
            c.pending.extend_from_slice(&buf[written..n]);
            return true;
        }
        if n < buf.len() && !hup {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
