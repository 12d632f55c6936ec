//! A worker that cannot run: takeoverd refuses a `--worker` path that is
//! missing or not executable at start, with a message that says what to
//! do, instead of restarting it forever; and a worker that fails before its
//! hello has its stderr lines forwarded to takeoverd's stderr unchanged.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

/// Runs `takeoverd` (the binary at `exe`) with `args` and `env` on a free
/// port, with its control socket in `dir`; it must exit within 5 s (one
/// that restarts its worker forever is killed then). Returns its exit
/// status, its stderr and how long it ran.
fn run_to_exit(
    exe: &Path,
    dir: &TempDir,
    args: &[&str],
    env: &[(&str, &OsStr)],
) -> (Option<ExitStatus>, String, Duration) {
    let log = dir.path("takeoverd.log");
    let t0 = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args(["--listen", &format!("127.0.0.1:{}", free_port()), "--control-socket"])
        .arg(dir.path("ctl.sock"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("starting takeoverd");
    let status = wait_timeout(&mut child, Duration::from_secs(5));
    let took = t0.elapsed();
    (status, std::fs::read_to_string(&log).unwrap(), took)
}

/// Asserts takeoverd exited 1 at once, naming `path` and saying `why`, and
/// set nothing up.
fn assert_refused(
    dir: &TempDir,
    (status, stderr, took): (Option<ExitStatus>, String, Duration),
    path: &Path,
    why: &[&str],
) {
    let status = status.unwrap_or_else(|| panic!("takeoverd did not exit within {took:?}:\n{stderr}"));
    assert_eq!(status.code(), Some(1), "takeoverd should exit 1:\n{stderr}");
    assert!(took < Duration::from_secs(3), "takeoverd took {took:?} to give up:\n{stderr}");
    let head = format!("worker {} cannot be run: ", path.display());
    assert!(stderr.contains(&head), "no {head:?} on stderr:\n{stderr}");
    for w in why {
        assert!(stderr.contains(w), "no {w:?} on stderr:\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 1, "one line, and no worker ever started:\n{stderr}");
    assert!(!dir.path("ctl.sock").exists(), "the control socket was set up before the check");
}

#[test]
fn a_missing_worker_is_refused_at_start() {
    let dir = TempDir::new("worker-missing");
    let path = dir.path("no-such-worker");
    let out = run_to_exit(&bin("takeoverd"), &dir, &["--worker", path.to_str().unwrap()], &[]);
    assert_refused(&dir, out, &path, &["no such file", "--worker PATH", "install seqnum-worker beside takeoverd"]);
}

#[test]
fn a_worker_that_is_not_executable_is_refused_at_start() {
    let dir = TempDir::new("worker-not-executable");
    let path = dir.path("worker.sh");
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_to_exit(&bin("takeoverd"), &dir, &["--worker", path.to_str().unwrap()], &[]);
    assert_refused(&dir, out, &path, &["not executable", "mode 0644", "--worker PATH"]);
}

#[test]
fn a_worker_that_is_a_directory_is_refused_at_start() {
    let dir = TempDir::new("worker-directory");
    let path = dir.path("workers");
    std::fs::create_dir(&path).unwrap();
    let out = run_to_exit(&bin("takeoverd"), &dir, &["--worker", path.to_str().unwrap()], &[]);
    assert_refused(&dir, out, &path, &["not a regular file but a directory"]);
}

#[test]
fn a_bare_worker_name_is_looked_up_in_path() {
    let dir = TempDir::new("worker-bare-name");
    let out =
        run_to_exit(&bin("takeoverd"), &dir, &["--worker", "no-such-worker-anywhere"], &[("PATH", dir.0.as_os_str())]);
    let path = Path::new("no-such-worker-anywhere");
    assert_refused(&dir, out, path, &["not found in $PATH", &dir.0.display().to_string()]);
}

#[test]
fn the_default_worker_missing_beside_takeoverd_is_refused_at_start() {
    let dir = TempDir::new("worker-default-missing");
    let exe = dir.path("takeoverd");
    std::fs::copy(bin("takeoverd"), &exe).unwrap();
    let out = run_to_exit(&exe, &dir, &[], &[]);
    assert_refused(&dir, out, &dir.path("seqnum-worker"), &["no such file", "install seqnum-worker beside takeoverd"]);
}

/// A worker script that writes `lines` to stderr and exits 3 before its
/// hello, in `dir`.
fn failing_worker(dir: &TempDir, lines: &str) -> std::path::PathBuf {
    let path = dir.path("failing-worker.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{lines}\nexit 3\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Starts takeoverd with `worker`, its stderr in `log`, and
/// `JOURNAL_STREAM=journal_stream` if given.
fn takeoverd_with_failing_worker(dir: &TempDir, worker: &Path, log: &Path, journal_stream: Option<String>) -> Reaper {
    let mut cmd = Command::new(bin("takeoverd"));
    cmd.args(["--listen", &format!("127.0.0.1:{}", free_port()), "--control-socket"])
        .arg(dir.path("ctl.sock"))
        .arg("--worker")
        .arg(worker)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(js) = journal_stream {
        cmd.env("JOURNAL_STREAM", js);
    }
    Reaper(cmd.spawn().expect("starting takeoverd"))
}

/// Threads of `pid`.
fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_worker_that_fails_before_its_hello_has_its_stderr_forwarded() {
    let dir = TempDir::new("worker-stderr");
    let worker = failing_worker(
        &dir,
        "echo 'failing-worker: first line' >&2\n\
         echo '<3>failing-worker: second line, with a priority' >&2\n\
         echo \"failing-worker: JOURNAL_STREAM=${JOURNAL_STREAM-unset}\" >&2\n\
         echo \"failing-worker: stderr=$(readlink /proc/$$/fd/2)\" >&2",
    );
    let log = dir.path("takeoverd.log");
    let d = takeoverd_with_failing_worker(&dir, &worker, &log, None);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    // takeoverd restarts it with backoff (0, 100, 200, 400 ms...): wait for
    // four attempts.
    wait_until("four attempts of the worker forwarded their lines", Duration::from_secs(10), || {
        text().lines().filter(|l| *l == "failing-worker: first line").count() >= 4
    });
    let text = text();
    for want in [
        "failing-worker: first line",
        "<3>failing-worker: second line, with a priority",
        "failing-worker: JOURNAL_STREAM=unset",
    ] {
        assert!(text.lines().any(|l| l == want), "{want:?} not forwarded as a line of its own:\n{text}");
    }
    let stderr = text.lines().find_map(|l| l.strip_prefix("failing-worker: stderr=")).unwrap();
    assert!(stderr.starts_with("pipe:"), "the worker's stderr should be a pipe to takeoverd, not {stderr}");
    // Each worker's forwarding thread ended with its stderr: the main
    // thread and at most the current worker's (and one finishing) remain.
    let threads = threads_of(d.0.id());
    assert!((1..=3).contains(&threads), "takeoverd has {threads} threads after four failed workers");
}

#[test]
fn under_the_journal_a_worker_keeps_its_priority_prefixes() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("worker-stderr-journal");
    // The worker says what JOURNAL_STREAM it got and what its stderr is.
    let worker = failing_worker(
        &dir,
        "echo \"<4>failing-worker: JOURNAL_STREAM=${JOURNAL_STREAM-unset} stderr=$(stat -L -c %d:%i /proc/$$/fd/2)\" >&2",
    );
    let log = dir.path("takeoverd.log");
    let meta = std::fs::File::create(&log).unwrap().metadata().unwrap();
    let _d = takeoverd_with_failing_worker(&dir, &worker, &log, Some(format!("{}:{}", meta.dev(), meta.ino())));
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the worker's line is forwarded", Duration::from_secs(10), || {
        text().contains("<4>failing-worker: JOURNAL_STREAM=")
    });
    let text = text();
    let line = text.lines().find(|l| l.starts_with("<4>failing-worker: ")).expect("the line starts with its priority");
    let (js, stderr) = line["<4>failing-worker: JOURNAL_STREAM=".len()..].split_once(" stderr=").unwrap();
    assert_eq!(js, stderr, "JOURNAL_STREAM must name the worker's own stderr (its pipe to takeoverd):\n{text}");
    assert_ne!(js, format!("{}:{}", meta.dev(), meta.ino()), "not takeoverd's stream");
    assert!(text.lines().all(|l| l.starts_with('<')), "a line without a priority prefix:\n{text}");
}
