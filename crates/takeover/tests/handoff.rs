//! The handoff protocol against real socketpairs: the happy path, batching,
//! and every kind of bad input a taker must reject without leaking an fd.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use takeover::{wire, Error, Item, Kind, Limits, Message, ProtocolError};

fn raw(v: Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&v).unwrap()
}

fn deadline() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(5))
}

fn limits() -> Limits {
    Limits { max_fds: 10_000 }
}

/// A pipe whose read end tells us when every copy of the write end is closed.
struct Probe {
    read: std::fs::File,
    write: Option<OwnedFd>,
}

impl Probe {
    fn new() -> Probe {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
        Probe { read: r.into(), write: Some(w) }
    }
    /// Drops our copy and reports whether any other copy is still open.
    fn others_open(mut self) -> bool {
        self.write = None;
        let mut b = [0u8; 1];
        match self.read.read(&mut b) {
            Ok(0) => false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn hands_over_listeners_and_connections_with_state() {
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    let t = std::thread::spawn(move || {
        takeover::hello(taker.as_fd(), deadline()).unwrap();
        let h = takeover::receive(taker.as_fd(), &limits(), deadline()).unwrap();
        takeover::ack(taker.as_fd(), deadline()).unwrap();
        h
    });
    assert_eq!(takeover::read_hello(giver.as_fd(), deadline()).unwrap(), std::process::id());
    let state = raw(json!({"next": 5}));
    let items = [
        Item { name: "l0", kind: Kind::TcpListener, fd: l.as_fd(), state: None },
        Item { name: "c1", kind: Kind::TcpStream, fd: server.as_fd(), state: Some(&state) },
    ];
    takeover::offer(giver.as_fd(), &items, &json!({"gen": 3}), false, deadline()).unwrap();
    takeover::await_ack(giver.as_fd(), deadline()).unwrap();
    let h = t.join().unwrap();
    assert_eq!(h.app, json!({"gen": 3}));
    assert_eq!(h.taken.len(), 2);
    assert_eq!(h.taken[1].state.as_ref().unwrap().get(), r#"{"next":5}"#);
    assert!(h.taken[0].state.is_none());
    // The received connection is the same connection: bytes cross it.
    drop(server);
    let mut got: TcpStream = TcpStream::from(h.taken[1].fd.try_clone().unwrap());
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    got.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
fn more_than_scm_max_fd_go_in_batches() {
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    let names: Vec<String> = (0..600).map(|i| format!("f{i}")).collect();
    let t = std::thread::spawn(move || {
        takeover::hello(taker.as_fd(), deadline()).unwrap();
        let h = takeover::receive(taker.as_fd(), &limits(), deadline()).unwrap();
        takeover::ack(taker.as_fd(), deadline()).unwrap();
        h
    });
    takeover::read_hello(giver.as_fd(), deadline()).unwrap();
    let files: Vec<std::fs::File> = (0..600).map(|_| std::fs::File::open("/proc/self/status").unwrap()).collect();
    let states: std::collections::HashMap<&String, _> = names.iter().map(|n| (n, raw(json!(n)))).collect();
    let items: Vec<Item<'_>> = files
        .iter()
        .zip(&names)
        .map(|(f, n)| Item { name: n, kind: Kind::File, fd: f.as_fd(), state: Some(&**states.get(n).unwrap()) })
        .collect();
    takeover::offer(giver.as_fd(), &items, &Value::Null, false, deadline()).unwrap();
    takeover::await_ack(giver.as_fd(), deadline()).unwrap();
    let h = t.join().unwrap();
    assert_eq!(h.taken.len(), 600);
    for (i, t) in h.taken.iter().enumerate() {
        assert_eq!(t.name, format!("f{i}"));
        assert_eq!(t.state.as_ref().unwrap().get(), format!("\"f{i}\""));
    }
}

/// Plays a hostile giver: sends `msgs` raw, and returns what the taker said.
fn against_taker(script: impl FnOnce(BorrowedFd<'_>) + Send + 'static) -> (Error, Option<Message>) {
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    let t = std::thread::spawn(move || {
        takeover::hello(taker.as_fd(), deadline()).unwrap();
        let r = takeover::receive(taker.as_fd(), &limits(), Some(Instant::now() + Duration::from_secs(2)));
        r.expect_err("the taker must reject this")
    });
    takeover::read_hello(giver.as_fd(), deadline()).unwrap();
    script(giver.as_fd());
    let err = t.join().unwrap();
    let reply = takeover::manifest::recv(giver.as_fd(), Some(Instant::now() + Duration::from_millis(500)))
        .ok()
        .flatten()
        .map(|(m, _)| m);
    (err, reply)
}

fn offer(fds: usize, batches: usize) -> Vec<u8> {
    Message::Offer { version: 1, fds, batches, recovered: false, app: Value::Null }.encode()
}

fn send(chan: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    wire::send(chan, bytes, fds, deadline()).unwrap();
}

fn assert_nack(reply: Option<Message>, want: &str) {
    match reply {
        Some(Message::Nack { reason }) => assert!(reason.contains(want), "nack {reason:?} should mention {want:?}"),
        other => panic!("expected a nack, got {other:?}"),
    }
}

#[test]
fn malformed_json_is_named_and_fds_closed() {
    let probe = Probe::new();
    let w = probe.write.as_ref().unwrap().try_clone().unwrap();
    let (err, reply) = against_taker(move |g| {
        send(g, &offer(1, 1), &[]);
        send(g, b"{\"type\":\"batch\",\"seq\":0,\"entries\":[{\"name\":", &[w.as_fd()]);
    });
    assert!(matches!(err, Error::Protocol(ProtocolError::Malformed { .. })), "{err}");
    assert!(err.to_string().contains("malformed message"), "{err}");
    assert_nack(reply, "malformed message");
    assert!(!probe.others_open(), "the fd that came with a malformed message leaked");
}

#[test]
fn unknown_version_is_refused_both_ways() {
    let (err, reply) = against_taker(|g| {
        send(g, &Message::Offer { version: 99, fds: 0, batches: 0, recovered: false, app: Value::Null }.encode(), &[])
    });
    assert!(matches!(err, Error::Version { theirs: 99 }), "{err}");
    assert_nack(reply, "version 99");

    // And a giver refuses a taker that speaks another version.
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    send(taker.as_fd(), br#"{"type":"hello","version":7,"pid":1,"future":"field"}"#, &[]);
    let err = takeover::read_hello(giver.as_fd(), deadline()).unwrap_err();
    assert!(matches!(err, Error::Version { theirs: 7 }), "{err}");
    match takeover::manifest::recv(taker.as_fd(), deadline()).unwrap() {
        Some((Message::Refuse { reason }, _)) => assert!(reason.contains("version 7"), "{reason}"),
        other => panic!("expected refuse, got {other:?}"),
    }
}

#[test]
fn more_fds_than_announced() {
    let probe = Probe::new();
    let w = probe.write.as_ref().unwrap().try_clone().unwrap();
    let f = std::fs::File::open("/proc/self/status").unwrap();
    let (err, reply) = against_taker(move |g| {
        send(g, &offer(1, 1), &[]);
        // One entry listed, two fds attached.
        let b = br#"{"type":"batch","seq":0,"entries":[{"name":"a","kind":"file"}]}"#;
        send(g, b, &[f.as_fd(), w.as_fd()]);
    });
    assert!(matches!(err, Error::Protocol(ProtocolError::BatchFds { seq: 0, listed: 1, carried: 2 })), "{err}");
    assert!(err.to_string().contains("lists 1 fds but carries 2"), "{err}");
    assert_nack(reply, "carries 2");
    assert!(!probe.others_open(), "the extra fd leaked");

    // A batch beyond the announced total.
    let probe = Probe::new();
    let w = probe.write.as_ref().unwrap().try_clone().unwrap();
    let (err, _) = against_taker(move |g| {
        send(g, &offer(0, 0), &[]);
        send(g, br#"{"type":"batch","seq":0,"entries":[{"name":"a","kind":"file"}]}"#, &[w.as_fd()]);
    });
    assert!(matches!(err, Error::Protocol(ProtocolError::FdsWithEnd { count: 1 })), "{err}");
    assert!(!probe.others_open(), "the unannounced fd leaked");
}

#[test]
fn an_fd_of_the_wrong_kind_is_rejected_and_closed() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (us, _them) = UnixStream::pair().unwrap();
    let probe = Probe::new();
    let w = probe.write.as_ref().unwrap().try_clone().unwrap();
    let (err, reply) = against_taker(move |g| {
        send(g, &offer(3, 1), &[]);
        let b = br#"{"type":"batch","seq":0,"entries":[{"name":"ok","kind":"tcp-listener"},{"name":"p","kind":"unix-stream"},{"name":"liar","kind":"tcp-stream"}]}"#;
        send(g, b, &[l.as_fd(), us.as_fd(), w.as_fd()]);
    });
    match &err {
        Error::BadFd { name, problem } => {
            assert_eq!(name, "liar");
            assert!(matches!(problem, takeover::FdError::NotSocket { expected: Kind::TcpStream }), "{problem}");
        }
        other => panic!("expected BadFd, got {other}"),
    }
    assert_nack(reply, "liar");
    assert!(!probe.others_open(), "the rejected fd leaked");
}

#[test]
fn oversized_message_is_rejected() {
    let (err, reply) = against_taker(|g| {
        let big = vec![b' '; wire::MAX_MESSAGE + 10];
        // Bypass our own sender's limit: the kernel takes it.
        nix::sys::socket::send(std::os::fd::AsRawFd::as_raw_fd(&g), &big, nix::sys::socket::MsgFlags::empty()).unwrap();
    });
    assert!(matches!(err, Error::Protocol(ProtocolError::TooLarge)), "{err}");
    assert_nack(reply, "larger than");
}

#[test]
fn a_giver_that_vanishes_mid_offer_is_a_clear_error() {
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    let t = std::thread::spawn(move || {
        takeover::hello(taker.as_fd(), deadline()).unwrap();
        takeover::receive(taker.as_fd(), &limits(), deadline()).unwrap_err()
    });
    takeover::read_hello(giver.as_fd(), deadline()).unwrap();
    send(giver.as_fd(), &offer(5, 1), &[]);
    drop(giver);
    let err = t.join().unwrap();
    assert!(matches!(err, Error::Disconnected(_)), "{err}");
}

#[test]
fn a_silent_peer_times_out() {
    let (giver, _taker) = wire::seqpacket_pair().unwrap();
    let t0 = Instant::now();
    let err = takeover::read_hello(giver.as_fd(), Some(Instant::now() + Duration::from_millis(100))).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(100));
}

#[test]
fn nack_rolls_back_the_giver() {
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    let f = std::fs::File::open("/proc/self/status").unwrap();
    let t = std::thread::spawn(move || {
        takeover::hello(taker.as_fd(), deadline()).unwrap();
        let h = takeover::receive(taker.as_fd(), &limits(), deadline()).unwrap();
        takeover::nack(taker.as_fd(), "not today").unwrap();
        h
    });
    takeover::read_hello(giver.as_fd(), deadline()).unwrap();
    takeover::offer(
        giver.as_fd(),
        &[Item { name: "f", kind: Kind::File, fd: f.as_fd(), state: None }],
        &Value::Null,
        false,
        deadline(),
    )
    .unwrap();
    let err = takeover::await_ack(giver.as_fd(), deadline()).unwrap_err();
    assert!(matches!(&err, Error::Refused(r) if r == "not today"), "{err}");
    t.join().unwrap();
}

#[test]
fn endpoints_work_at_paths_longer_than_sun_path() {
    let base = std::env::temp_dir().join(format!("takeover-long-{}", std::process::id()));
    let deep = base.join("d".repeat(60)).join("e".repeat(60));
    std::fs::create_dir_all(&deep).unwrap();
    let path = deep.join("takeover.sock");
    assert!(path.as_os_str().len() > 108);
    let ep = takeover::Endpoint::bind(&path, takeover::Existing::ReplaceStale).unwrap();
    let chan = takeover::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(ep.accept().unwrap().is_some());
    drop(chan);
    // A live endpoint is not stolen, even through the long path.
    assert!(takeover::Endpoint::bind(&path, takeover::Existing::ReplaceStale).is_err());
    drop(ep);
    let _ = std::fs::remove_dir_all(&base);
}
