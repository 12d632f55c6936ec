//! One client connection: its lock-step state and non-blocking I/O.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Registry;

use crate::MESSAGE_LEN;

const _: () = assert!(MESSAGE_LEN == 4, "a seqnum is a big-endian u32");

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Not connected yet (waiting for its turn in the ramp).
    Pending,
    /// Non-blocking connect under way.
    Connecting,
    /// Message `seq` is being written or its echo awaited.
    InFlight,
    /// Echo received; the next send is scheduled.
    Idle,
    /// Closed, cleanly or after an error; never driven again.
    Closed,
}

/// Result of reading as far as possible.
#[derive(Debug)]
pub(crate) enum ReadStep {
    /// Nothing more to read now.
    WouldBlock,
    /// A complete echo arrived; `early` if it came before the whole message
    /// was even written.
    Echo { value: u32, early: bool },
    /// `n` bytes arrived while no message was in flight.
    Unexpected(usize),
    /// The server closed its side.
    Eof,
    /// The read failed.
    Failed(io::Error),
}

/// Result of checking a connect in progress.
#[derive(Debug)]
pub(crate) enum ConnectStep {
    Pending,
    Connected,
    Failed(io::Error),
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: Option<TcpStream>,
    pub(crate) state: State,
    /// Seqnum in flight, or the next one to send.
    pub(crate) seq: u32,
    /// Messages whose sending began.
    pub(crate) sent: u64,
    /// Bytes of the message in flight already written.
    out_pos: u8,
    in_buf: [u8; MESSAGE_LEN],
    in_fill: u8,
    /// When the message in flight was sent, or the connect started.
    pub(crate) since: Instant,
    /// Whether a deadline for this connection sits in the timeout heap.
    pub(crate) timeout_armed: bool,
}

impl Conn {
    pub(crate) fn new(now: Instant) -> Self {
        Conn {
            stream: None,
            state: State::Pending,
            seq: 0,
            sent: 0,
            out_pos: 0,
            in_buf: [0; MESSAGE_LEN],
            in_fill: 0,
            since: now,
            timeout_armed: false,
        }
    }

    /// Connected and not closed.
    pub(crate) fn is_established(&self) -> bool {
        matches!(self.state, State::InFlight | State::Idle)
    }

    /// After a readiness event on a connecting socket.
    pub(crate) fn check_connect(&self) -> ConnectStep {
        let Some(stream) = &self.stream else {
            return ConnectStep::Pending;
        };
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return ConnectStep::Failed(e),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => ConnectStep::Connected,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectStep::Pending,
            Err(e) => ConnectStep::Failed(e),
        }
    }

    /// Starts message `seq` at `now`; the caller then calls [`Conn::flush`].
    pub(crate) fn begin_send(&mut self, now: Instant) {
        self.state = State::InFlight;
        self.out_pos = 0;
        self.in_fill = 0;
        self.since = now;
        self.sent += 1;
    }

    /// Writes what is left of the message in flight, until done or
    /// `WouldBlock` (which is not an error).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let bytes = self.seq.to_be_bytes();
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        while self.state == State::InFlight && usize::from(self.out_pos) < MESSAGE_LEN {
            match stream.write(&bytes[usize::from(self.out_pos)..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n as u8,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads until a full echo, `WouldBlock`, EOF or an error.
    pub(crate) fn read_step(&mut self) -> ReadStep {
        let Some(stream) = self.stream.as_mut() else {
            return ReadStep::WouldBlock;
        };
        loop {
            let r = if self.state == State::InFlight {
                stream.read(&mut self.in_buf[usize::from(self.in_fill)..])
            } else {
                let mut scratch = [0u8; 64];
                stream.read(&mut scratch)
            };
            match r {
                Ok(0) => return ReadStep::Eof,
                Ok(n) if self.state != State::InFlight => return ReadStep::Unexpected(n),
                Ok(n) => {
                    self.in_fill += n as u8;
                    if usize::from(self.in_fill) == MESSAGE_LEN {
                        self.in_fill = 0;
                        return ReadStep::Echo {
                            value: u32::from_be_bytes(self.in_buf),
                            early: usize::from(self.out_pos) < MESSAGE_LEN,
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return ReadStep::Failed(e),
            }
        }
    }

    /// Closes the connection; with `clean`, shuts down the write side first
    /// so the server reads an EOF.
    pub(crate) fn close(&mut self, registry: &Registry, clean: bool) {
        if let Some(mut stream) = self.stream.take() {
            if clean {
                let _ = stream.shutdown(Shutdown::Write);
            }
            let _ = registry.deregister(&mut stream);
        }
        self.state = State::Closed;
    }
}
