//! The seqnum echo protocol of the seed (acassen/socket-takeover): a client
//! sends a 4-byte big-endian `u32` counter from 0 upward, lock-step, and the
//! server echoes each 4 bytes back.
//!
//! - [`echo`]: the server side of one connection, crash-safe across handoffs.
//! - [`worker`]: `seqnum-worker`, the event loop around it.
//! - [`client`]: `seqnum-client`, the load generator and judge.
#![deny(unsafe_code)]

pub mod client;
pub mod echo;
pub mod worker;

/// Size of one protocol message.
pub const MESSAGE_LEN: usize = 4;
