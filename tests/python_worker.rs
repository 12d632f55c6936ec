//! The Python worker of examples/python (written from docs/PROTOCOL.md
//! alone, standard library only) under takeoverd, end to end:
//! - it serves through reloads and a SIGKILL (a recovered restart) without
//!   a client seeing a single error;
//! - it hands over to the Rust `seqnum-worker` and takes over from it.
//!
//! Without python3 the tests print a SKIP line and pass, except under
//! `CI=true`, where they fail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use testkit::*;

/// Both tests put 50 connections and a Python worker on the machine: one at
/// a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether python3 (3.8 or later) runs; if not, fails under `CI=true` and
/// otherwise prints a SKIP line that the test harness does not capture.
fn python3_or_skip(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    skip(&format!("{test}: python3 (3.8 or later) is not on PATH"));
    false
}

/// The absolute path of examples/python/seqnum_worker.py, which must be
/// executable (takeoverd execs it; its shebang finds python3).
fn python_worker() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/seqnum_worker.py");
    let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
        "{} is not executable: chmod +x it",
        p.display()
    );
    p
}

/// Prints takeoverd's log when the test fails.
struct LogOnFailure(PathBuf);

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            let _ = writeln!(std::io::stderr(), "---- takeoverd's log ({}):\n{log}----", self.0.display());
        }
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The serving worker's pid, checked to be the program `expect` names.
fn serving(d: &Takeoverd, expect: &str) -> u32 {
    let pid = ctl_status(&d.sock).worker_pid.expect("a worker serves");
    let cmd = cmdline(pid);
    assert!(cmd.contains(expect), "worker {pid} should be {expect}, it runs: {cmd}");
    pid
}

fn sockets_of(pid: u32) -> usize {
    fds_of(pid).iter().filter(|f| f.starts_with("socket:")).count()
}

fn reload(d: &Takeoverd, what: &str, old: u32) {
    let out = ctl(&d.sock, &["reload"]);
    assert!(out.status.success(), "reload ({what}) failed: {out:?}");
    let _ = writeln!(std::io::stderr(), "reload ({what}): {}", String::from_utf8_lossy(&out.stdout).trim());
    let new = ctl_status(&d.sock).worker_pid.expect("a worker serves");
    assert_ne!(new, old, "reload ({what}) reported success but the same worker serves");
}

fn kill9_and_wait(d: &Takeoverd, pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("a new worker serves after the kill", Duration::from_secs(5), || {
        try_ctl_status(&d.sock).and_then(|s| s.worker_pid).is_some_and(|p| p != pid)
    });
}

/// The clients' traffic between two operations (the pace of the test, not
/// a wait for some state).
fn pace() {
    std::thread::sleep(Duration::from_millis(300));
}

/// 50 connections, lock-step, ~5 ms between an echo and the next seqnum,
/// for `secs` seconds.
fn load(port: u16, secs: &str) -> Child {
    client(port, &["--connections", "50", "--interval-ms", "5", "--duration", secs, "--timeout-ms", "5000"])
}

fn assert_still_loading(load: &mut Child) {
    assert!(
        load.try_wait().unwrap().is_none(),
        "the client finished before the test's reloads and kill were done: they did not happen under load"
    );
}

/// `--worker` is the Python script: 3 reloads (Python to Python), then a
/// SIGKILL of the serving Python worker (its successor serves
/// `recovered: true` and reconciles with the kernel's byte counters), all
/// under 50 connections echoing every ~5 ms: not one client error.
#[test]
fn a_python_worker_serves_through_reloads_and_a_kill() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !python3_or_skip("a_python_worker_serves_through_reloads_and_a_kill") {
        return;
    }
    let script = python_worker();
    let dir = TempDir::new("python-worker");
    let d = Takeoverd::start(&dir, &["--worker", script.to_str().unwrap()], &[]);
    let _log = LogOnFailure(d.log.clone());
    let mut load = load(d.port, "6");
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 50);
    let mut pid = serving(&d, "seqnum_worker.py");
    for i in 1..=3 {
        pace();
        reload(&d, &format!("Python to Python, {i} of 3"), pid);
        pid = serving(&d, "seqnum_worker.py");
        assert_eq!(sockets_of(pid), 51, "the Python worker holds its channel and the 50 connections, nothing else");
    }
    pace();
    kill9_and_wait(&d, pid);
    let pid = serving(&d, "seqnum_worker.py");
    wait_until("the recovered Python worker holds its channel and the 50 connections", Duration::from_secs(5), || {
        sockets_of(pid) == 51
    });
    pace();
    assert_still_loading(&mut load);
    let (out, v) = client_summary(load);
    let _ = writeln!(std::io::stderr(), "client: {v}");
    assert_clean(&out, &v);
    let st = ctl_status(&d.sock);
    assert_eq!(st.worker_restarts, 1, "only the kill should have cost a worker: {st:?}");
    wait_until("every connection the client closed is reported closed", Duration::from_secs(5), || {
        ctl_status(&d.sock).connections == 0
    });
}

/// A wrapper worker runs the Python script or the Rust `seqnum-worker`,
/// whichever `choice` names, so that one takeoverd reloads between them.
fn choosing_worker(dir: &TempDir, script: &Path) -> (PathBuf, PathBuf) {
    let choice = dir.path("choice");
    let wrapper = dir.path("worker.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$(cat {})\" in\n  rust) exec {} \"$@\" ;;\n  *) exec {} \"$@\" ;;\nesac\n",
            choice.display(),
            bin("seqnum-worker").display(),
            script.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (wrapper, choice)
}

/// Python → Rust → Python, a SIGKILL of the Python worker, then Rust →
/// Python again, under load: the two implementations hand every connection
/// (and the states of those stopped in the middle of a message) to each
/// other, and no client sees an error.
#[test]
fn python_and_rust_workers_hand_over_to_each_other() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !python3_or_skip("python_and_rust_workers_hand_over_to_each_other") {
        return;
    }
    let script = python_worker();
    let dir = TempDir::new("python-rust");
    let (wrapper, choice) = choosing_worker(&dir, &script);
    std::fs::write(&choice, "python").unwrap();
    let d = Takeoverd::start(&dir, &["--worker", wrapper.to_str().unwrap()], &[]);
    let _log = LogOnFailure(d.log.clone());
    let mut load = load(d.port, "8");
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 50);
    let mut pid = serving(&d, "seqnum_worker.py");
    for (to, expect) in [("rust", "seqnum-worker"), ("python", "seqnum_worker.py")] {
        pace();
        std::fs::write(&choice, to).unwrap();
        reload(&d, &format!("to {to}"), pid);
        pid = serving(&d, expect);
    }
    pace();
    kill9_and_wait(&d, pid);
    pid = serving(&d, "seqnum_worker.py");
    for (to, expect) in [("rust", "seqnum-worker"), ("python", "seqnum_worker.py")] {
        pace();
        std::fs::write(&choice, to).unwrap();
        reload(&d, &format!("to {to}, after the kill"), pid);
        pid = serving(&d, expect);
    }
    pace();
    assert_still_loading(&mut load);
    let (out, v) = client_summary(load);
    let _ = writeln!(std::io::stderr(), "client: {v}");
    assert_clean(&out, &v);
    let st = ctl_status(&d.sock);
    assert_eq!(st.worker_restarts, 1, "only the kill should have cost a worker: {st:?}");
}
