//! Transactional handoff of listening and live sockets between processes.
//!
//! A *giver* (a server that is about to be replaced) offers every fd it
//! serves, each with a name, a [`Kind`] and a JSON state, over a
//! `SOCK_SEQPACKET` Unix socket; the fds travel as `SCM_RIGHTS` in batches of
//! at most 253. The *taker* (its successor) validates every fd against the
//! manifest, adopts them, and only then acks. Until the ack the giver keeps
//! its copies and resumes serving on any failure: a crash, a `nack`, a
//! timeout. The wire protocol is written down in `docs/PROTOCOL.md`.
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use std::os::fd::AsFd;
//! # fn main() -> Result<(), takeover::Error> {
//! // Taker: connect, say hello, receive and validate, adopt, ack.
//! let chan = takeover::connect("/run/app/takeover".as_ref())?;
//! let deadline = Some(Instant::now() + Duration::from_secs(5));
//! takeover::hello(chan.as_fd(), deadline)?;
//! let handoff = takeover::receive(chan.as_fd(), &takeover::Limits::default(), deadline)?;
//! for taken in &handoff.taken {
//!     println!("{} is a {}", taken.name, taken.kind);
//! }
//! takeover::ack(chan.as_fd(), deadline)?;
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod channel;
pub mod control;
mod endpoint;
mod error;
mod fd;
mod handoff;
#[cfg(feature = "log")]
pub mod log;
pub mod manifest;
pub mod priority;
mod sys;
mod tcp;
mod throttle;
pub mod wire;
pub mod worker;

pub use endpoint::{check_peer, connect, Endpoint, Existing};
pub use error::{Error, ProtocolError, Result};
pub use fd::{validate, FdError, Kind};
pub use handoff::{
    ack, await_ack, fd_headroom, hello, nack, offer, raise_fd_limit, read_hello, receive, Handoff, Item, Limits, Taken,
};
pub use manifest::{check_name, Entry, Message, NameError, RawState, StateEntry, PROTOCOL_VERSION};
pub use sys::{pass_fd, socket_cookie, take_env_fd, take_raw_inherited};
pub use tcp::{bind_tcp, peer_closed, receive_memory_pinned, stream_offsets, StreamOffsets};
pub use throttle::Throttle;
