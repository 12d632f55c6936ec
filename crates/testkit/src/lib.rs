//! Test support shared by the end-to-end tests (`tests/*.rs` of the root
//! package) and seqnum-bench: where the binaries are and a temp dir per test
//! ([`bins`]), what `/proc` says about a process ([`procfs`]), the one
//! polling wait ([`wait`]), seqnum-client runs read into its typed
//! [`Summary`] ([`client`](mod@client)), takeoverd run directly
//! and its typed [`Status`] ([`daemon`]), and a
//! private `systemd --user` manager ([`systemd`]), and the visible
//! `SKIP:` of a test that cannot run here ([`skip`](mod@skip)).
//!
//! Everything is re-exported at the top, so a test writes `use testkit::*;`.

pub mod bins;
pub mod client;
pub mod daemon;
pub mod procfs;
pub mod skip;
pub mod systemd;
pub mod wait;

pub use bins::*;
pub use client::*;
pub use daemon::*;
pub use procfs::*;
pub use skip::skip;
pub use wait::*;
