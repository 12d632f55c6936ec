//! What takeoverd's control socket speaks, as types: the requests
//! (`protocol`) and the replies (`status`). The `takeoverd` binary serves
//! them and `takeoverd ctl` sends them; the end-to-end tests and seqnum-bench
//! read `takeoverd ctl status --json` into the same types.
#![forbid(unsafe_code)]

pub mod protocol;
pub mod status;
