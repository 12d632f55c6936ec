//! Development-mode plumbing: a worker behind `systemd-socket-activate`
//! (LISTEN_FDS via listenfd), and log lines with sd-daemon `<N>` priority
//! prefixes when stderr is the journal (JOURNAL_STREAM).

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::*;

#[test]
fn a_worker_serves_listeners_passed_in_listen_fds() {
    if Command::new("systemd-socket-activate").arg("--help").output().is_err() {
        return skip("systemd-socket-activate is not installed (package systemd)");
    }
    let port = free_port();
    let sa = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .arg(bin("seqnum-worker"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _sa = Reaper(sa);
    wait_for_port(port, Duration::from_secs(10));
    let c = client(port, &["--connections", "5", "--count", "20", "--interval-ms", "0"]);
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    assert_eq!(v.echoed, 100);
}

#[test]
fn log_lines_carry_priority_prefixes_under_the_journal() {
    let dir = TempDir::new("journal");
    let port = free_port();
    let log_path = dir.path("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let d = Command::new(bin("takeoverd"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--control-socket", dir.path("ctl.sock").to_str().unwrap()])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(log)
        .spawn()
        .unwrap();
    // Binding the same address twice fails: an error line, then exit 1.
    let mut d = Reaper(d);
    let status = wait_timeout(&mut d.0, Duration::from_secs(10)).expect("takeoverd should fail to bind twice");
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.lines().any(|l| l.starts_with("<3>takeoverd[")), "no <3> error line:\n{text}");
    assert!(text.lines().all(|l| l.starts_with('<')), "a line without a priority prefix:\n{text}");
    assert!(!text.contains("Z  "), "timestamps should be left to the journal:\n{text}");

    // A running pair: the worker's lines are prefixed too.
    let log_path = dir.path("stderr2.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let d = Command::new(bin("takeoverd"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--control-socket", dir.path("ctl2.sock").to_str().unwrap()])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Reaper(d);
    wait_for_port(port, Duration::from_secs(10));
    let text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until("takeoverd and its worker have logged", Duration::from_secs(5), || {
        let t = text();
        t.contains("takeoverd[") && t.contains("seqnum-worker[")
    });
    drop(d);
    let text = text();
    assert!(text.lines().any(|l| l.starts_with("<6>takeoverd[")), "no <6> takeoverd line:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("<6>seqnum-worker[")), "no <6> worker line:\n{text}");
}
