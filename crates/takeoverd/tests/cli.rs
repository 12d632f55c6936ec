//! takeoverd's command line: help, usage errors, and a ctl that finds no
//! daemon. (Being an integration test of this package, it also makes
//! `cargo test --workspace` build the takeoverd binary that the end-to-end
//! tests in the workspace's tests/ drive.)

use std::process::Command;

fn takeoverd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_takeoverd")).args(args).output().unwrap()
}

#[test]
fn help_explains_and_exits_zero() {
    let out = takeoverd(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["--listen", "--worker", "--fdstore-max", "ctl", "Exit status"] {
        assert!(text.contains(want), "--help does not mention {want}:\n{text}");
    }
}

#[test]
fn a_bad_argument_is_named_and_exits_two() {
    let out = takeoverd(&["--listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen") && err.contains("not-an-address"), "{err}");
}

#[test]
fn ctl_without_a_daemon_says_so_and_exits_one() {
    let dir = std::env::temp_dir().join(format!("takeoverd-cli-{}", std::process::id()));
    let sock = dir.join("nothing.sock");
    let out = takeoverd(&["ctl", "--control-socket", sock.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is takeoverd running?") && err.contains("nothing.sock"), "{err}");
}
