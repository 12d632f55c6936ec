//! Property tests of every decoder of the takeover protocol: random and
//! mutated input never panics, never leaks an fd, and always yields an error
//! that says something.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::json;
use takeover::{channel, control, wire, Entry, Kind, Limits, Message};

fn valid_messages() -> Vec<Vec<u8>> {
    let entry = Entry { name: "c1z".into(), kind: Kind::TcpStream, state: json!({"next": 7, "peer": "127.0.0.1:5"}) };
    vec![
        Message::Hello { version: 1, pid: 42 }.encode(),
        Message::Offer { version: 1, fds: 2, batches: 1, recovered: false, app: json!({"generation": 3}) }.encode(),
        Message::Batch {
            seq: 0,
            entries: vec![entry.clone(), Entry { name: "l0".into(), kind: Kind::File, state: json!(null) }],
        }
        .encode(),
        Message::End { fds: 2 }.encode(),
        Message::Nack { reason: "no".into() }.encode(),
        control::FromWorker::Opened { entry }.encode(),
        control::FromWorker::State { entries: vec![] }.encode(),
        control::ToWorker::Quiesce.encode(),
        channel::FromWorker::Ready { count: 2 }.encode(),
    ]
}

/// A message that is a valid one with a few bytes flipped, inserted or cut.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (0..valid_messages().len(), prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..6)).prop_map(
        |(i, edits)| {
            let mut m = valid_messages()[i].clone();
            for (pos, byte, op) in edits {
                if m.is_empty() {
                    break;
                }
                let p = pos as usize % m.len();
                match op {
                    0 => m[p] = byte,
                    1 => m.insert(p, byte),
                    _ => {
                        m.remove(p);
                    }
                }
            }
            m
        },
    )
}

/// What every decoder (the takeover protocol and both directions of both
/// supervisor channel versions) says of `bytes`: the errors.
fn decode_errors(bytes: &[u8]) -> Vec<takeover::Error> {
    [
        Message::decode(bytes).err(),
        control::ToWorker::decode(bytes).err(),
        control::FromWorker::decode(bytes).err(),
        channel::ToWorker::decode(bytes).err(),
        channel::FromWorker::decode(bytes).err(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Pipes whose read ends tell whether every copy of the write end is closed.
struct Probes {
    reads: Vec<std::fs::File>,
}

impl Probes {
    fn new(n: usize) -> (Probes, Vec<OwnedFd>) {
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..n {
            let (r, w) = nix::unistd::pipe().unwrap();
            nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
            reads.push(r.into());
            writes.push(w);
        }
        (Probes { reads }, writes)
    }

    /// True when no write end is open anywhere any more.
    fn all_closed(&mut self) -> bool {
        self.reads.iter_mut().all(|r| matches!(r.read(&mut [0u8; 1]), Ok(0)))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn decoding_random_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for e in decode_errors(&bytes) {
            prop_assert!(e.to_string().len() > 10);
        }
    }

    #[test]
    fn decoding_mutated_messages_never_panics(bytes in mutated()) {
        for e in decode_errors(&bytes) {
            prop_assert!(e.to_string().contains("malformed message"), "{}", e);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// A hostile giver sends a random script of (mutated or valid) messages,
    /// each with a random number of fds attached: the taker returns (an error,
    /// almost always) without panicking, and every fd it received is closed.
    #[test]
    fn a_taker_fed_garbage_closes_every_fd(script in prop::collection::vec((mutated(), 0usize..4), 1..6)) {
        let (giver, taker) = wire::seqpacket_pair().unwrap();
        let total: usize = script.iter().map(|(_, n)| n).sum();
        let (mut probes, writes) = Probes::new(total);
        let t = std::thread::spawn(move || {
            let deadline = Some(Instant::now() + Duration::from_millis(300));
            let r = takeover::receive(taker.as_fd(), &Limits { max_fds: 1000 }, deadline);
            let ok = r.is_ok();
            if let Err(e) = &r {
                assert!(!e.to_string().is_empty());
            }
            drop(r);
            ok
        });
        let mut writes = writes.into_iter();
        for (bytes, n) in &script {
            let fds: Vec<OwnedFd> = writes.by_ref().take(*n).collect();
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            if bytes.len() <= wire::MAX_MESSAGE && !bytes.is_empty() {
                let _ = wire::send(giver.as_fd(), bytes, &borrowed, Some(Instant::now() + Duration::from_millis(100)));
            }
        }
        drop(writes);
        let _ = t.join().expect("the taker panicked");
        drop(giver);
        // Whatever the taker did, no fd it was sent is still open, in the
        // taker or queued in the channel.
        prop_assert!(probes.all_closed(), "an fd sent to the taker leaked");
    }

    /// The same for a giver reading a taker's hello, and for the control
    /// channel's quiesce collector.
    #[test]
    fn a_giver_and_a_supervisor_fed_garbage_do_not_panic(bytes in mutated(), n in 0usize..3) {
        let (a, b) = wire::seqpacket_pair().unwrap();
        let (mut probes, writes) = Probes::new(n);
        let borrowed: Vec<_> = writes.iter().map(|f| f.as_fd()).collect();
        if !bytes.is_empty() {
            wire::send(b.as_fd(), &bytes, &borrowed, None).unwrap();
            wire::send(b.as_fd(), &bytes, &borrowed, None).unwrap();
        }
        drop(borrowed);
        drop(writes);
        let deadline = Some(Instant::now() + Duration::from_millis(50));
        let _ = takeover::read_hello(a.as_fd(), deadline);
        let _ = takeover::control::collect_quiesced(a.as_fd(), deadline, |_, fds| drop(fds));
        drop(b);
        // Drain anything left so queued fds are released, then check.
        while let Ok(Some(Some(_))) = wire::try_recv(a.as_fd()) {}
        drop(a);
        prop_assert!(probes.all_closed(), "an fd leaked");
    }
}
