//! `seqnum-client --json` runs of the tests, read into the client's own
//! [`Summary`] type.

use std::process::{Child, Command, Output, Stdio};

pub use seqnum::client::Summary;

use crate::bins::bin;

/// Starts `seqnum-client --json` against `port` with extra `args`.
pub fn client(port: u16, args: &[&str]) -> Child {
    Command::new(bin("seqnum-client"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting seqnum-client")
}

/// Reads the `--json` summary: the last line of the client's stdout.
pub fn parse_summary(stdout: &str) -> Result<Summary, serde_json::Error> {
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
}

/// Waits for a client and parses its JSON summary.
pub fn client_summary(c: Child) -> (Output, Summary) {
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let s = parse_summary(&stdout).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON summary ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, s)
}

/// Asserts a client summary shows no error of any kind.
pub fn assert_clean(out: &Output, s: &Summary) {
    let json = s.to_json();
    assert_eq!(s.errors, 0, "client saw errors: {json}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client exited {:?}: {json}", out.status);
    assert!(s.echoed > 0, "client got no echo at all: {json}");
}
